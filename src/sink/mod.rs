//! Sinks: where records leave the appliance.

pub mod mqtt;
