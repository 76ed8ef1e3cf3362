//! herald-ingress: accepts `POST /msg` requests, authenticates them, and
//! answers 202 only once RabbitMQ confirmed the job.

pub mod admission;
pub mod alerts;
pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod hash_password;
pub mod idempotency;
pub mod jobs;
pub mod metrics;
pub mod password;
pub mod payload;
pub mod policy;
pub mod publisher;
pub mod reload;
pub mod routes;
pub mod server;
pub mod throttle;
pub mod users;

pub use app::Application;
pub use error::Error;
