//! The stasis command-line tool and coordinator.
