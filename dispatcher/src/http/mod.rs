//! The HTTP API (`dispatcher serve`): the routes and their middleware
//! (`server`), the state they share (`state`), the job handlers
//! (`job_routes`), the job listing (`list_routes`, its query in
//! `list_query`), the LoRA registry's (`lora_routes`), the one mapping of
//! errors to answers (`error`), the extractors they share (`extract`), the
//! generated OpenAPI document (`openapi`), the `Prefer` header (`prefer`),
//! `/v1/limits` and the web page.

pub mod error;
pub mod extract;
pub mod job_routes;
pub mod limits;
pub mod list_query;
pub mod list_routes;
pub mod lora_routes;
pub mod openapi;
pub mod page;
pub mod prefer;
pub mod queue_routes;
pub mod server;
pub mod state;
pub mod webhook_routes;
