//! `tailgres audit`: reads the JSON-lines audit log back for a person.
//!
//! This first part is what a record looks like to the reader ([`Entry`]),
//! when things happened ([`parse_instant`]) and which records the operator
//! asked for ([`Filter`]).
#![forbid(unsafe_code)]

mod entry;
mod filter;
mod when;

pub use entry::{Entry, LineError};
pub use filter::{EventKind, Filter, Glob, WhoPattern};
pub use when::{parse_instant, parse_rfc3339, TimeError};
