//! crispd, the CRI daemon
