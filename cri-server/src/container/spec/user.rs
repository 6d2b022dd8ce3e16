//! The user a container runs as: `run_as_user`/`run_as_username` or the image's `User`,
//! resolved against the image's /etc/passwd and /etc/group, with supplemental groups.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

pub(super) struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

pub(super) fn passwd_entries(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })
        .collect()
}

/// (name, gid, members) from /etc/group.
pub(super) fn group_entries(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Who the process runs as: CRI run_as_user / run_as_username / run_as_group over the image's
/// USER, names resolved in the image's /etc/passwd and /etc/group; supplemental groups are the
/// primary group, the user's groups in the image (unless the policy is Strict) and the CRI
/// ones, each once.
pub fn resolve_user(
    sc: &pb::LinuxContainerSecurityContext,
    image_user: &str,
    ctx: &SpecContext<'_>,
) -> Result<ResolvedUser, SpecError> {
    let db = UserDb {
        passwd: ctx.passwd.map(passwd_entries).unwrap_or_default(),
        groups: ctx.group.map(group_entries).unwrap_or_default(),
    };
    let (image_u, image_g) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let (uid, mut gid, name) = if let Some(u) = &sc.run_as_user {
        let uid = u32::try_from(u.value).map_err(|_| {
            invalid(
                "linux.security_context.run_as_user",
                format!("{} out of range", u.value),
            )
        })?;
        db.user("linux.security_context.run_as_user", &uid.to_string())?
    } else if !sc.run_as_username.is_empty() {
        db.user(
            "linux.security_context.run_as_username",
            &sc.run_as_username,
        )?
    } else if !image_u.is_empty() {
        db.user("image config User", image_u)?
    } else {
        (0, Some(0), Some("root".into()))
    };
    // An image's explicit group applies only when the user also comes from the image.
    if sc.run_as_user.is_none()
        && sc.run_as_username.is_empty()
        && let Some(g) = image_g.filter(|g| !g.is_empty())
    {
        gid = Some(db.group("image config User", g)?);
    }
    if let Some(g) = run_as_group(sc)? {
        gid = Some(g);
    }
    let gid = gid.unwrap_or(0);
    let additional_gids = supplemental_groups(sc, &db, name.as_deref(), gid)?;
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

/// The image's /etc/passwd and /etc/group, as read from its layers.
struct UserDb {
    passwd: Vec<PasswdEntry>,
    groups: Vec<(String, u32, Vec<String>)>,
}

impl UserDb {
    /// A user by uid (known to passwd or not) or name: (uid, its gid, its name).
    fn user(
        &self,
        field: &str,
        name: &str,
    ) -> Result<(u32, Option<u32>, Option<String>), SpecError> {
        if let Ok(uid) = name.parse::<u32>() {
            let e = self.passwd.iter().find(|e| e.uid == uid);
            return Ok((uid, e.map(|e| e.gid), e.map(|e| e.name.clone())));
        }
        self.passwd
            .iter()
            .find(|e| e.name == name)
            .map(|e| (e.uid, Some(e.gid), Some(e.name.clone())))
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("user {name:?} not found in the image's /etc/passwd"),
                )
            })
    }

    /// A group by gid or name.
    fn group(&self, field: &str, name: &str) -> Result<u32, SpecError> {
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(gid);
        }
        self.groups
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, g, _)| *g)
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("group {name:?} not found in the image's /etc/group"),
                )
            })
    }
}

/// `run_as_group`, which needs a user chosen by the pod author too.
fn run_as_group(sc: &pb::LinuxContainerSecurityContext) -> Result<Option<u32>, SpecError> {
    let Some(g) = &sc.run_as_group else {
        return Ok(None);
    };
    // As containerd: a group alone would pair with whatever user the image names, which
    // the pod author did not choose.
    if sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
        return Err(invalid(
            "linux.security_context.run_as_group",
            format!("user group \"{}\" is specified without user", g.value),
        ));
    }
    let gid = u32::try_from(g.value).map_err(|_| {
        invalid(
            "linux.security_context.run_as_group",
            format!("{} out of range", g.value),
        )
    })?;
    Ok(Some(gid))
}

/// The primary group, the user's groups from the image's /etc/group (unless the policy is
/// Strict), then the context's `supplemental_groups`, each once.
fn supplemental_groups(
    sc: &pb::LinuxContainerSecurityContext,
    db: &UserDb,
    name: Option<&str>,
    gid: u32,
) -> Result<Vec<u32>, SpecError> {
    // The primary group is a supplementary group too, as containerd (since the fix for
    // CVE-2023-25173) and Docker set it: a process that drops its gid keeps that access, and
    // ContainerStatus.user lists it (critest's SupplementalGroupsPolicy specs expect it).
    let mut extra: Vec<u32> = vec![gid];
    let strict = SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy)
        == Ok(SupplementalGroupsPolicy::Strict);
    if !strict && let Some(n) = name {
        for (_, g, members) in &db.groups {
            if members.iter().any(|m| m == n) && !extra.contains(g) {
                extra.push(*g);
            }
        }
    }
    for g in &sc.supplemental_groups {
        let g = u32::try_from(*g).map_err(|_| {
            invalid(
                "linux.security_context.supplemental_groups",
                format!("{g} out of range"),
            )
        })?;
        if !extra.contains(&g) {
            extra.push(g);
        }
    }
    Ok(extra)
}
