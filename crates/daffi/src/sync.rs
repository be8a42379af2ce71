//! Lock helpers: a panic while holding a lock must not make every later call panic too.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Read-locks, recovering the data if a holder panicked.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks, recovering the data if a holder panicked.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
