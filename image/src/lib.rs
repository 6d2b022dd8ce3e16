//! Images: OCI distribution client, hosts.toml registry config, verified content store, safe layer unpacking into snapshots.
