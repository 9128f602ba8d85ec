//! Credentials as kubectl finds them. A kubeconfig's `exec` plugin named
//! without a path (`gke-gcloud-auth-plugin`, `aws`, `kubelogin`) is looked
//! up on the PATH a login shell of the user would have, because an app
//! started from the desktop menu inherits a bare PATH that lacks where
//! people install such tools; it then runs with that PATH, so the tools it
//! calls in turn are found too. A plugin found nowhere is reported by name.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::Kubeconfig;

/// Most time a login shell gets to print its PATH (a slow profile).
const LOGIN_SHELL_TIMEOUT: Duration = Duration::from_secs(5);
const START: &str = "__K3S_LOCAL_AGENT_PATH_START__";
const END: &str = "__K3S_LOCAL_AGENT_PATH_END__";

/// Where one kubeconfig user's exec plugin was looked for, and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLookup {
    /// The kubeconfig user it belongs to.
    pub user: String,
    /// The command as the kubeconfig names it.
    pub command: String,
    /// Where it was found: `None` when on neither PATH.
    pub found: Option<PathBuf>,
    /// The PATH searched (the login shell's, then this process's).
    pub searched: String,
}

impl PluginLookup {
    /// What to do when it was not found.
    pub fn missing(&self) -> Option<String> {
        self.found.is_none().then(|| {
            format!(
                "credential plugin {:?} (user {:?}) is not on the login shell's PATH nor this \
                 program's ({}): install it, or give its full path as `command` in the kubeconfig",
                self.command, self.user, self.searched
            )
        })
    }
}

/// The user's login shell: `$SHELL`, else the password database's, else `/bin/sh`.
fn login_shell() -> PathBuf {
    if let Some(shell) = std::env::var_os("SHELL").filter(|shell| !shell.is_empty()) {
        return PathBuf::from(shell);
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|user| user.shell)
        .filter(|shell| shell.is_file())
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

/// The PATH a login shell of this user has: what `$SHELL -l -i -c` prints
/// (interactive too, since many people extend PATH in their rc file), read
/// between markers so a chatty profile cannot spoil it. `None` when the
/// shell fails or takes too long.
pub fn login_shell_path() -> Option<String> {
    let shell = login_shell();
    let script = format!("printf '%s%s%s' '{START}' \"$PATH\" '{END}'");
    let mut child = Command::new(&shell)
        .args(["-l", "-i", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .inspect_err(
            |err| tracing::debug!(shell = %shell.display(), error = %err, "no login shell"),
        )
        .ok()?;
    let deadline = Instant::now() + LOGIN_SHELL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(shell = %shell.display(), "the login shell did not print its PATH in time");
                return None;
            }
        }
    }
    let mut output = String::new();
    child.stdout.take()?.read_to_string(&mut output).ok()?;
    let start = output.find(START)? + START.len();
    let end = start + output[start..].find(END)?;
    Some(output[start..end].to_owned()).filter(|path| !path.is_empty())
}

/// The first executable `program` on `path` (a colon-separated list).
fn find_on(path: &str, program: &str) -> Option<PathBuf> {
    // Only names without a path come here, so the directory is never used.
    which::which_in(program, Some(path), "/").ok()
}

/// Points every exec plugin named without a path at where it was found
/// (the login shell's PATH first), and gives it that PATH to run with.
/// Returns each lookup, for `doctor` and the logs.
pub fn resolve_plugins(kubeconfig: &mut Kubeconfig, login_path: Option<&str>) -> Vec<PluginLookup> {
    let own_path = std::env::var("PATH").unwrap_or_default();
    let searched = match login_path {
        Some(login) if !own_path.is_empty() => format!("{login}:{own_path}"),
        Some(login) => login.to_owned(),
        None => own_path,
    };
    let mut lookups = Vec::new();
    for named in &mut kubeconfig.auth_infos {
        let Some(exec) = named.auth_info.as_mut().and_then(|info| info.exec.as_mut()) else {
            continue;
        };
        let Some(command) = exec.command.clone() else {
            continue;
        };
        if Path::new(&command).components().count() > 1 {
            // Given with a path: used as it is.
            continue;
        }
        let found = find_on(&searched, &command);
        if let Some(full) = &found {
            exec.command = Some(full.display().to_string());
            let env = exec.env.get_or_insert_with(Vec::new);
            if !env
                .iter()
                .any(|var| var.get("name").is_some_and(|name| name == "PATH"))
            {
                env.push(
                    [
                        ("name".to_owned(), "PATH".to_owned()),
                        ("value".to_owned(), searched.clone()),
                    ]
                    .into_iter()
                    .collect(),
                );
            }
        }
        let lookup = PluginLookup {
            user: named.name.clone(),
            command,
            found,
            searched: searched.clone(),
        };
        match lookup.missing() {
            Some(why) => tracing::warn!("{why}"),
            None => {
                tracing::debug!(user = %lookup.user, command = %lookup.command, "credential plugin found")
            }
        }
        lookups.push(lookup);
    }
    lookups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig_with_plugin(command: &str) -> Kubeconfig {
        Kubeconfig::from_yaml(&format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: dev\n  user:\n    exec:\n      \
             apiVersion: client.authentication.k8s.io/v1\n      command: {command}\n"
        ))
        .expect("kubeconfig")
    }

    #[test]
    fn a_plugin_on_the_login_path_is_used_by_its_full_path_with_that_path() {
        let dir = tempfile::tempdir().expect("dir");
        let plugin = dir.path().join("my-auth-plugin");
        std::fs::write(&plugin, "#!/bin/sh\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let login = format!("/nowhere:{}", dir.path().display());
        let mut kubeconfig = kubeconfig_with_plugin("my-auth-plugin");
        let lookups = resolve_plugins(&mut kubeconfig, Some(&login));
        assert_eq!(lookups.len(), 1);
        assert_eq!(lookups[0].found.as_deref(), Some(plugin.as_path()));
        assert_eq!(lookups[0].missing(), None);
        let exec = kubeconfig.auth_infos[0]
            .auth_info
            .as_ref()
            .and_then(|info| info.exec.as_ref())
            .expect("exec");
        assert_eq!(
            exec.command.as_deref(),
            Some(plugin.to_str().expect("utf-8"))
        );
        let path = exec
            .env
            .as_ref()
            .and_then(|env| env.iter().find(|var| var["name"] == "PATH"))
            .map(|var| var["value"].clone())
            .expect("PATH given to the plugin");
        assert!(path.starts_with(&login), "{path}");
    }

    #[test]
    fn a_plugin_found_nowhere_is_named_with_the_fix() {
        let mut kubeconfig = kubeconfig_with_plugin("no-such-auth-plugin-xyz");
        let lookups = resolve_plugins(&mut kubeconfig, Some("/nowhere"));
        let why = lookups[0].missing().expect("missing");
        assert!(why.contains("no-such-auth-plugin-xyz"), "{why}");
        assert!(why.contains("full path"), "{why}");
    }
}
