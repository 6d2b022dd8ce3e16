//! The test images: what they are called, where their OCI layouts are, and where the
//! registry storage that already holds them is.
//!
//! `hack/images/build.sh` builds them from local material (`make test-images`, which
//! `make test` runs first) into `$CRISP_TEST_IMAGES`, by default `<workspace>/target/test-images`:
//! one OCI layout per image (`<dir>/<name>/`), the same as an archive (`<dir>/<name>.tar`), and
//! `<dir>/registry/`, docker-registry storage with every image pushed under every tag of
//! [`TestImage::tags`]. [`crate::registry::Registry::push`] hard-links from that storage, so a
//! test's registry has its images in milliseconds instead of a skopeo push per test.
//!
//! Missing or stale images are an error naming the command that builds them: a test that
//! needs an image fails, it never skips.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// One test image. The table below and `PUSHES`/`IMAGES` in hack/images/build.sh must agree;
/// the `registry` test checks that every image here is in the layouts and in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestImage {
    /// Directory of its layout under the images dir, and the name tests use.
    pub name: &'static str,
    /// The registry an upstream name would use; a mirror of it onto the test registry makes
    /// [`TestImage::upstream`] resolve there.
    pub upstream_registry: &'static str,
    /// Repository path in the registry: the upstream path without the host.
    pub repository: &'static str,
    /// Tags in the registry; the first is also the layout's ref name.
    pub tags: &'static [&'static str],
}

/// Debian's dynamic busybox with glibc, every applet a hard link in /bin, Cmd ["sh"].
pub const BUSYBOX: TestImage = TestImage {
    name: "busybox",
    upstream_registry: "docker.io",
    repository: "library/busybox",
    tags: &["latest", "1.36"],
};

/// busybox plus four layers exercising the unpacker; see [`layers`] for what it contains.
pub const LAYERS: TestImage = TestImage {
    name: "layers",
    upstream_registry: "docker.io",
    repository: "library/layers",
    tags: &["latest"],
};

/// busybox with `USER 1000:1000`, user `crisp` (1000:1000, home /home/crisp, the working dir).
pub const USER: TestImage = TestImage {
    name: "user",
    upstream_registry: "docker.io",
    repository: "library/user",
    tags: &["latest"],
};

/// busybox plus one layer holding `/large.bin`, 208 MiB of incompressible data.
pub const LARGE: TestImage = TestImage {
    name: "large",
    upstream_registry: "docker.io",
    repository: "library/large",
    tags: &["latest"],
};

/// An image index: linux/amd64 and linux/arm64/v8. Both manifests carry the amd64
/// busybox; `/etc/crisp-arch` holds `amd64` or `arm64`, telling which one was pulled.
pub const MULTIARCH: TestImage = TestImage {
    name: "multiarch",
    upstream_registry: "docker.io",
    repository: "library/multiarch",
    tags: &["latest"],
};

/// busybox with its layer zstd-compressed (`application/vnd.oci.image.layer.v1.tar+zstd`).
pub const BUSYBOX_ZSTD: TestImage = TestImage {
    name: "busybox-zstd",
    upstream_registry: "docker.io",
    repository: "library/busybox-zstd",
    tags: &["latest"],
};

/// The sandbox image: a static `/pause` alone, Entrypoint ["/pause"], USER 65535:65535. Tagged
/// 3.6 (containerd 1.6's default sandbox image) and 3.9 (kubelet 1.36's).
pub const PAUSE: TestImage = TestImage {
    name: "pause",
    upstream_registry: "registry.k8s.io",
    repository: "pause",
    tags: &["3.9", "3.6", "latest"],
};

/// Every test image.
pub const ALL: &[TestImage] = &[BUSYBOX, LAYERS, USER, LARGE, MULTIARCH, BUSYBOX_ZSTD, PAUSE];

/// Facts about the `layers` image that tests check from inside a container (build.sh
/// asserts the matching tar entries when it builds the image).
pub mod layers {
    /// 19 directories `d00`..`d18` of 100 files `f00`..`f99`, each holding "dNN/fNN\n".
    pub const MANY_DIR: &str = "/data/many";
    /// Deleted by a directory whiteout (`data/many/.wh.d19`) in a later layer.
    pub const DELETED_DIR: &str = "/data/many/d19";
    /// Deleted by a whiteout (`data/.wh.gone.txt`); must not exist.
    pub const DELETED_FILE: &str = "/data/gone.txt";
    /// Contents "keep\n".
    pub const KEPT_FILE: &str = "/data/keep.txt";
    /// "lower\n" in one layer, "upper\n" in a later one: must read "upper\n".
    pub const REPLACED_FILE: &str = "/data/replaced.txt";
    /// Opaque directory (`.wh..wh..opq`): only `new.txt` ("new\n"); `a.txt`, `b.txt` and
    /// `c.txt` from below are hidden.
    pub const OPAQUE_DIR: &str = "/data/opq";
    /// Two names of one inode, contents "hard\n".
    pub const HARD_LINKS: [&str; 2] = ["/data/hardlink/orig", "/data/hardlink/link"];
    /// Symlink to `keep.txt` (relative).
    pub const SYMLINK: &str = "/data/symlink";
    /// Symlink to `/data/keep.txt` (absolute).
    pub const ABS_SYMLINK: &str = "/data/abs-symlink";
    /// Carries the extended attribute `user.crisp=test`.
    pub const XATTR_FILE: &str = "/data/xattr.txt";
    pub const XATTR: (&str, &str) = ("user.crisp", "test");
    /// root:root mode 4755; prints "Effective uid: N".
    pub const SETUID_BINARY: &str = "/usr/local/bin/nnp";
}

impl TestImage {
    /// The tag of its OCI layout, and its first tag in the registry.
    pub fn tag(&self) -> &'static str {
        self.tags[0]
    }

    /// Its OCI layout directory (use as `oci:<layout>:<tag>`).
    pub fn layout(&self) -> Result<PathBuf> {
        Ok(images_dir()?.join(self.name))
    }

    /// Its OCI layout as a tar archive (use as `oci-archive:<archive>`).
    pub fn archive(&self) -> Result<PathBuf> {
        Ok(images_dir()?.join(format!("{}.tar", self.name)))
    }

    /// Its name on the test registry at `host` ("127.0.0.1:PORT"), first tag.
    pub fn reference(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repository, self.tag())
    }

    /// Its upstream name, first tag, e.g. `docker.io/library/busybox:latest`: what a runtime
    /// whose mirror for the upstream registry is the test registry pulls.
    pub fn upstream(&self) -> String {
        format!(
            "{}/{}:{}",
            self.upstream_registry,
            self.repository,
            self.tag()
        )
    }

    /// The manifest (or index) digest recorded in its layout, "sha256:…".
    pub fn digest(&self) -> Result<String> {
        let path = self.layout()?.join("index.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        index["manifests"][0]["digest"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{} has no manifests[0].digest", path.display()))
    }
}

/// The test image called `name`.
pub fn get(name: &str) -> Result<&'static TestImage> {
    ALL.iter().find(|i| i.name == name).with_context(|| {
        let known: Vec<_> = ALL.iter().map(|i| i.name).collect();
        format!("no test image {name:?}; known: {}", known.join(", "))
    })
}

/// The workspace root (the images dir default and hack/images are found from it).
pub fn workspace_root() -> PathBuf {
    // e2e/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where the images are: `$CRISP_TEST_IMAGES`, else `<workspace>/target/test-images`;
/// checked once per process to be built and up to date with hack/images.
pub fn images_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = match std::env::var_os("CRISP_TEST_IMAGES") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => workspace_root().join("target/test-images"),
        };
        check_images_dir(&dir)
            .map(|()| dir)
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// docker-registry storage holding every test image (see the module docs).
pub fn registry_seed() -> Result<PathBuf> {
    Ok(images_dir()?.join("registry"))
}

/// Checks that `dir` holds every layout, archive and the registry seed, built from the
/// current hack/images (its `.stamp` is the hash build.sh writes last, so a build that was
/// interrupted is not mistaken for a finished one).
pub fn check_images_dir(dir: &Path) -> Result<()> {
    let build = "run `make test-images` (hack/images/build.sh)";
    let stamp_path = dir.join(".stamp");
    let stamp = match fs::read_to_string(&stamp_path) {
        Ok(s) => s.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("test images are not built in {}: {build}", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", stamp_path.display())),
    };
    let mut missing: Vec<String> = Vec::new();
    for image in ALL {
        for p in [
            dir.join(image.name).join("index.json"),
            dir.join(format!("{}.tar", image.name)),
        ] {
            if !p.exists() {
                missing.push(p.display().to_string());
            }
        }
    }
    if !dir.join("registry/docker").is_dir() {
        missing.push(dir.join("registry/docker").display().to_string());
    }
    if !missing.is_empty() {
        bail!(
            "test images in {} are incomplete (missing {}): {build}",
            dir.display(),
            missing.join(", ")
        );
    }
    let hack = workspace_root().join("hack/images");
    // Without the sources (tests run from a copied binary) the stamp cannot be checked;
    // the images are then taken as they are.
    if hack.is_dir() {
        let want = sources_hash(&hack)?;
        if stamp != want {
            bail!(
                "test images in {} are stale (hack/images changed since they were built): {build}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The hash build.sh writes to `.stamp`: sha256 of `sha256sum` output over every regular
/// file directly in `dir`, sorted by name in byte order.
pub fn sources_hash(dir: &Path) -> Result<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_type()?.is_file() {
            names.push(
                entry.file_name().into_string().map_err(|n| {
                    anyhow::anyhow!("non-UTF-8 file name {n:?} in {}", dir.display())
                })?,
            );
        }
    }
    names.sort();
    let mut listing = String::new();
    for name in names {
        let path = dir.join(&name);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        listing.push_str(&format!(
            "{}  {name}\n",
            hex::encode(Sha256::digest(&bytes))
        ));
    }
    Ok(hex::encode(Sha256::digest(listing.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_images_name_the_build_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = format!(
            "{:#}",
            check_images_dir(dir.path()).expect_err("empty dir must fail")
        );
        assert!(err.contains("make test-images"), "{err}");
        assert!(err.contains("hack/images/build.sh"), "{err}");
    }

    #[test]
    fn incomplete_images_are_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = sources_hash(&workspace_root().join("hack/images")).expect("hash");
        fs::write(dir.path().join(".stamp"), format!("{hash}\n")).expect("stamp");
        let err = format!(
            "{:#}",
            check_images_dir(dir.path()).expect_err("no layouts must fail")
        );
        assert!(
            err.contains("incomplete") && err.contains("make test-images"),
            "{err}"
        );
    }

    #[test]
    fn sources_hash_matches_build_sh() {
        // The same pipeline build.sh runs; if this drifts, every run would rebuild or
        // every check would call fresh images stale.
        let hack = workspace_root().join("hack/images");
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg("find . -maxdepth 1 -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum | cut -d' ' -f1")
            .current_dir(&hack)
            .output()
            .expect("bash");
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            sources_hash(&hack).expect("hash")
        );
    }

    #[test]
    fn names_and_references() {
        assert_eq!(
            get("busybox").expect("busybox").upstream(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(PAUSE.upstream(), "registry.k8s.io/pause:3.9");
        assert_eq!(
            BUSYBOX.reference("127.0.0.1:5000"),
            "127.0.0.1:5000/library/busybox:latest"
        );
        assert!(get("nope").is_err());
    }
}
