//! meshgate: a federated SQL gateway for a data mesh.
//!
//! A request flows one way through the layers:
//!
//! ```text
//! Flight SQL client
//!   │  gRPC (Handshake, GetFlightInfo, DoGet, DoPut, DoAction)
//!   ▼
//! flight    decode the Flight SQL command; encode answers      (thin adapter)
//!   ▼
//! auth      bearer JWT → CallerIdentity (Basic → minted token in Handshake)
//!   ▼
//! query     guard the SQL (read-only, sandboxed), plan it in a session
//!   │       built for this caller, bind parameters, execute
//!   ▼
//! catalog   catalog `mesh`: domain schemas, products → table providers
//!   ▼
//! sources   object storage files (Parquet, CSV, JSON, Arrow IPC); PostgreSQL,
//!           SQLite and Flight SQL, sent whole sub-plans as SQL
//!   ▼
//! query     stream of wire-typed batches (no view types, no empty batches)
//!   ▼
//! flight    FlightData stream with one schema, equal to FlightInfo's
//! ```

pub mod allocator;
pub mod api;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod demo;
pub mod flight;
pub mod metrics;
pub mod policy;
pub mod query;
pub mod server;
pub mod sources;
