//! Integration tests: a real gateway on port 0, real Flight clients.

mod adversarial;
mod auth;
mod catalog_api;
mod cli;
mod federation;
mod fixture;
mod flight_sql;
mod http;
mod jdbc;
mod limits;
mod pg;
mod policies;
mod queries;
mod refusals;
mod reload;
mod tls;
