//! Integration tests: a real gateway on port 0, real Flight clients.

mod adversarial;
mod auth;
mod cli;
mod fixture;
mod flight_sql;
mod http;
mod jdbc;
mod limits;
mod policies;
mod queries;
mod refusals;
