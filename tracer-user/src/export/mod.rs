//! Export: what users see. [`events`] is the event stream (text or JSON lines).

pub mod events;
