//! (images helper)
