//! Sinks: where records leave the appliance.

pub mod control;
pub mod flow;
pub mod identity;
pub mod mqtt;
