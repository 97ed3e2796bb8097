//! Export: what users see. [`events`] is the event stream (text or JSON lines), [`metrics`] the
//! Prometheus exporter, served with the rest of the agent's HTTP API by [`http`].

pub mod events;
pub mod http;
pub mod metrics;
