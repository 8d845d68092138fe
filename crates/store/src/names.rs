//! Checkpoint ids and names.

use crate::error::StoreError;

/// The index encoded in a checkpoint id (`0007-1a2b3c4d` → 7).
pub(crate) fn index_of_id(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

pub(crate) fn looks_like_id(name: &str) -> bool {
    match name.split_once('-') {
        Some((index, tag)) => {
            !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
                && tag.len() == 8
                && tag.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1..=64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if name == "latest" {
        return bad("\"latest\" always means the newest checkpoint");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return bad("a number would be read as a checkpoint index");
    }
    if looks_like_id(name) {
        return bad("looks like a checkpoint id");
    }
    Ok(())
}
