//! Export: what users see. [`events`] is the event stream (text or JSON lines), [`metrics`] the
//! Prometheus exporter, [`api`] the JSON the live view reads, [`live`] the live terminal view
//! (`tracer top`); [`http`] serves the agent's endpoints.

pub mod api;
pub mod events;
pub mod http;
pub mod live;
pub mod metrics;
