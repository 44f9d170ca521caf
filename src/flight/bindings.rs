//! The parameters last bound to each prepared statement, for clients that
//! keep using the handle they prepared after binding.
//!
//! Binding parameters (DoPut of a prepared statement) answers with a new
//! handle that carries them, so that any replica can run it; ADBC and
//! current JDBC drivers use that handle. Clients written before the Flight
//! SQL protocol returned one (flightsql-dbapi, older JDBC drivers) ignore it
//! and ask for the flight info with the handle they prepared. For them this
//! gateway remembers, per prepared handle, the handle its last bind made;
//! such a client reaches one gateway over its one connection. A handle's
//! statement id (see [`super::handle::StatementHandle`]) tells two
//! preparations of the same SQL apart, so one never runs with the other's
//! parameters.

use std::time::Duration;

use bytes::Bytes;

/// The bound handles this gateway keeps, by the size of both handles.
const CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

/// How long a binding is kept after its last use.
const IDLE_FOR: Duration = Duration::from_secs(60 * 60);

/// Prepared handle → the handle its last bind made.
#[derive(Debug, Clone)]
pub(crate) struct LastBindings {
    bound: moka::sync::Cache<Bytes, Bytes>,
}

impl Default for LastBindings {
    fn default() -> Self {
        Self {
            bound: moka::sync::Cache::builder()
                .max_capacity(CAPACITY_BYTES)
                .weigher(|prepared: &Bytes, bound: &Bytes| {
                    u32::try_from(prepared.len() + bound.len()).unwrap_or(u32::MAX)
                })
                .time_to_idle(IDLE_FOR)
                .build(),
        }
    }
}

impl LastBindings {
    /// Records that binding parameters to `prepared` made `bound`.
    pub(crate) fn remember(&self, prepared: Bytes, bound: Bytes) {
        self.bound.insert(prepared, bound);
    }

    /// The handle to run for a client that presents `handle`: the one its
    /// last bind made, or `handle` itself when it was never bound here.
    pub(crate) fn resolve(&self, handle: &Bytes) -> Bytes {
        self.bound.get(handle).unwrap_or_else(|| handle.clone())
    }

    /// Forgets a closed prepared statement's binding.
    pub(crate) fn forget(&self, prepared: &Bytes) {
        self.bound.invalidate(prepared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_resolves_to_its_last_binding_until_forgotten() {
        let bindings = LastBindings::default();
        let prepared = Bytes::from_static(b"prepared");
        assert_eq!(bindings.resolve(&prepared), prepared);
        bindings.remember(prepared.clone(), Bytes::from_static(b"first"));
        bindings.remember(prepared.clone(), Bytes::from_static(b"second"));
        assert_eq!(bindings.resolve(&prepared), Bytes::from_static(b"second"));
        let other = Bytes::from_static(b"other");
        assert_eq!(bindings.resolve(&other), other);
        bindings.forget(&prepared);
        assert_eq!(bindings.resolve(&prepared), prepared);
    }
}
