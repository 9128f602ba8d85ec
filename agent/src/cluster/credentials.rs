//! Credentials as kubectl finds them. A kubeconfig's `exec` plugin named
//! without a path (`gke-gcloud-auth-plugin`, `aws`, `kubelogin`) is looked
//! up on the PATH a login shell of the user would have, because an app
//! started from the desktop menu inherits a bare PATH that lacks where
//! people install such tools; it then runs with that PATH, so the tools it
//! calls in turn are found too. A plugin found nowhere is reported by name.
//!
//! The plugins and the login shell run here, not inside kube: as async
//! child processes (no thread of the runtime waits on them), each in a
//! process group of its own, under a deadline that kills the whole group
//! (a plugin waiting on a browser login or a dead network, with a helper
//! of its own holding its pipe, ends with everything it started), and
//! killed when the agent stops. kube runs an exec plugin synchronously
//! wherever its client is built and with no deadline at all, so one that
//! hangs would hold a runtime worker (the whole API on one CPU) and the
//! agent's exit for good.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::config::{ExecConfig, Kubeconfig};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;

/// Most time a login shell gets to print its PATH (a slow profile).
const LOGIN_SHELL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the login shell's PATH is taken as it was: a rebuilt client
/// (after a failure or a 401) reuses it rather than starting the user's
/// interactive login shell again, yet a tool installed since is found
/// within minutes.
const LOGIN_PATH_TTL: Duration = Duration::from_secs(300);
/// Most time an exec credential plugin gets to print its credentials. It
/// runs with no terminal (the agent has none to ask on), so one that has
/// not answered by then is waiting for something that will not come.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a failed plugin's stderr its error quotes.
const STDERR_QUOTED: usize = 500;
const START: &str = "__K3S_LOCAL_AGENT_PATH_START__";
const END: &str = "__K3S_LOCAL_AGENT_PATH_END__";

/// Why an exec credential plugin gave no credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error(
        "credential plugin did not answer in {} s: {command} (user {user:?}) was stopped with \
         every process it started; run it by hand to see what it waits for (a browser login? \
         a network it cannot reach?)",
        .timeout.as_secs()
    )]
    Timeout {
        command: String,
        user: String,
        timeout: Duration,
    },
    #[error("credential plugin {command} (user {user:?}) could not start: {source}")]
    Start {
        command: String,
        user: String,
        // Shared: the error is cloned to every connection waiting on it.
        source: Arc<io::Error>,
    },
    #[error("credential plugin {command} (user {user:?}) could not start: the kubeconfig names no command")]
    NoCommand { command: String, user: String },
    #[error(
        "credential plugin {command} (user {user:?}) could not start: the cluster's info: {source}"
    )]
    ClusterInfo {
        command: String,
        user: String,
        source: Arc<serde_json::Error>,
    },
    #[error("credential plugin {command} (user {user:?}) failed ({status}): {stderr}")]
    Failed {
        command: String,
        user: String,
        status: String,
        stderr: String,
    },
    #[error(
        "credential plugin {command} (user {user:?}) printed no usable ExecCredential: {source}"
    )]
    Output {
        command: String,
        user: String,
        source: ExecCredentialError,
    },
    #[error("the agent is stopping: no credential plugin is started")]
    Stopping,
}

/// Why what an exec plugin printed is no usable `ExecCredential`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecCredentialError {
    #[error("{0}")]
    // Shared: the error is cloned to every connection waiting on it.
    Json(Arc<serde_json::Error>),
    #[error("it has no status")]
    NoStatus,
    #[error("expirationTimestamp {at:?}: {source}")]
    Expiration {
        at: String,
        source: chrono::ParseError,
    },
    #[error("neither a token nor a client certificate and key")]
    NothingUsable,
    #[error("no token this time")]
    NoToken,
    #[error("the token cannot be sent: {0}")]
    // Shared: the error is cloned to every connection waiting on it.
    Unsendable(Arc<hyper::http::header::InvalidHeaderValue>),
}

/// What an exec plugin answered (its `ExecCredential`'s status).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PluginCredentials {
    pub token: Option<String>,
    /// When the token or certificate expires; `None`: not said.
    pub expires: Option<DateTime<Utc>>,
    /// PEM, as the plugin printed it.
    pub client_certificate: Option<String>,
    pub client_key: Option<String>,
}

impl std::fmt::Debug for PluginCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        f.debug_struct("PluginCredentials")
            .field("token", &self.token.as_ref().map(|_| "..."))
            .field("expires", &self.expires)
            .field("client_certificate", &self.client_certificate.is_some())
            .finish_non_exhaustive()
    }
}

/// The child processes run for credentials (plugins, the login shell),
/// with the login shell's PATH as last found. One per staging cluster
/// (and one per `doctor` run): [`CredentialProcesses::stop`] kills every
/// group still running and starts no more, so the agent's exit never waits
/// on them.
#[derive(Debug, Default)]
pub struct CredentialProcesses {
    groups: Mutex<Groups>,
    login_path: tokio::sync::Mutex<Option<(Instant, Option<String>)>>,
}

/// The process groups running now, and whether more may start.
#[derive(Debug, Default)]
struct Groups {
    stopped: bool,
    running: HashSet<i32>,
}

/// Kills a child's process group when dropped while armed: on a deadline,
/// and when the future running it is dropped (the agent stopping).
struct GroupGuard<'a> {
    processes: &'a CredentialProcesses,
    group: i32,
    armed: bool,
}

impl GroupGuard<'_> {
    /// The child answered: whatever it left running in the background is
    /// the user's (kubectl leaves it too).
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        let mut groups = self.processes.lock_groups();
        if groups.running.remove(&self.group) && self.armed {
            kill_group(self.group);
        }
    }
}

fn kill_group(group: i32) {
    // The leader is not reaped before its guard drops, so the id still
    // names this group (it cannot have been reused).
    if let Err(err) = killpg(Pid::from_raw(group), Signal::SIGKILL) {
        tracing::debug!(group, error = %err, "process group already gone");
    }
}

impl CredentialProcesses {
    fn lock_groups(&self) -> parking_lot::MutexGuard<'_, Groups> {
        self.groups.lock()
    }

    /// Kills every credential process group still running and refuses new
    /// ones: the agent is stopping.
    pub fn stop(&self) {
        let mut groups = self.lock_groups();
        groups.stopped = true;
        for group in groups.running.drain() {
            kill_group(group);
        }
    }

    /// Spawns `command` as the leader of a process group of its own, and
    /// the guard that kills that group.
    fn spawn(
        &self,
        command: &mut tokio::process::Command,
    ) -> Result<(tokio::process::Child, GroupGuard<'_>), SpawnError> {
        command.process_group(0).kill_on_drop(true);
        let mut groups = self.lock_groups();
        if groups.stopped {
            return Err(SpawnError::Stopping);
        }
        // Spawned under the lock, so `stop` cannot miss it.
        let child = command.spawn().map_err(SpawnError::Io)?;
        let Some(group) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            return Err(SpawnError::Io(std::io::Error::other(
                "the child has no process id",
            )));
        };
        groups.running.insert(group);
        drop(groups);
        Ok((
            child,
            GroupGuard {
                processes: self,
                group,
                armed: true,
            },
        ))
    }

    /// The login shell's PATH, found at most every [`LOGIN_PATH_TTL`].
    pub async fn login_path(&self) -> Option<String> {
        let mut last = self.login_path.lock().await;
        if let Some((at, path)) = last.as_ref() {
            if at.elapsed() < LOGIN_PATH_TTL {
                return path.clone();
            }
        }
        let path = self.run_login_shell().await;
        *last = Some((Instant::now(), path.clone()));
        path
    }

    /// The PATH a login shell of this user has: what `$SHELL -l -i -c`
    /// prints (interactive too, since many people extend PATH in their rc
    /// file), read between markers so a chatty profile cannot spoil it.
    /// `None` when the shell fails or takes too long (then its group is
    /// killed).
    async fn run_login_shell(&self) -> Option<String> {
        let shell = login_shell();
        let script = format!("printf '%s%s%s' '{START}' \"$PATH\" '{END}'");
        let mut command = tokio::process::Command::new(&shell);
        command
            .args(["-l", "-i", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let (mut child, guard) = self
            .spawn(&mut command)
            .inspect_err(
                |err| tracing::debug!(shell = %shell.display(), error = %err, "no login shell"),
            )
            .ok()?;
        let mut stdout = child.stdout.take()?;
        // Read up to the end marker, not to the end of the pipe: a process
        // the profile started in the background may hold the pipe open.
        let read = async {
            let mut output = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = stdout.read(&mut chunk).await.ok()?;
                if n == 0 {
                    break;
                }
                output.extend_from_slice(&chunk[..n]);
                if String::from_utf8_lossy(&output).contains(END) {
                    break;
                }
            }
            Some(output)
        };
        let output = match tokio::time::timeout(LOGIN_SHELL_TIMEOUT, read).await {
            Ok(output) => output,
            Err(_) => {
                tracing::warn!(shell = %shell.display(), "the login shell did not print its PATH in time");
                return None;
            }
        };
        guard.disarm();
        // The shell is reaped in the background once it exits.
        drop(child);
        let output = String::from_utf8_lossy(&output?).into_owned();
        let start = output.find(START)? + START.len();
        let end = start + output[start..].find(END)?;
        Some(output[start..end].to_owned()).filter(|path| !path.is_empty())
    }

    /// Runs `user`'s exec plugin as client-go would, without a terminal:
    /// its arguments and environment, `KUBERNETES_EXEC_INFO`, the cluster
    /// when it asks for it; killed with its process group after `timeout`.
    pub async fn run_plugin(
        &self,
        user: &str,
        exec: &ExecConfig,
        timeout: Duration,
    ) -> Result<PluginCredentials, PluginError> {
        let command_name = exec.command.clone().unwrap_or_default();
        let start_error = |err: io::Error| PluginError::Start {
            command: command_name.clone(),
            user: user.to_owned(),
            source: Arc::new(err),
        };
        if command_name.is_empty() {
            return Err(PluginError::NoCommand {
                command: command_name,
                user: user.to_owned(),
            });
        }
        let mut command = tokio::process::Command::new(&command_name);
        command.args(exec.args.iter().flatten());
        for var in exec.env.iter().flatten() {
            if let (Some(name), Some(value)) = (var.get("name"), var.get("value")) {
                command.env(name, value);
            }
        }
        let mut spec = serde_json::json!({ "interactive": false });
        if exec.provide_cluster_info {
            if let Some(cluster) = &exec.cluster {
                spec["cluster"] =
                    serde_json::to_value(cluster).map_err(|err| PluginError::ClusterInfo {
                        command: command_name.clone(),
                        user: user.to_owned(),
                        source: Arc::new(err),
                    })?;
            }
        }
        let info = serde_json::json!({
            "apiVersion": exec.api_version,
            "kind": "ExecCredential",
            "spec": spec,
        });
        command.env("KUBERNETES_EXEC_INFO", info.to_string());
        for name in exec.drop_env.iter().flatten() {
            command.env_remove(name);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (child, guard) = self.spawn(&mut command).map_err(|err| match err {
            SpawnError::Stopping => PluginError::Stopping,
            SpawnError::Io(err) => start_error(err),
        })?;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(err)) => return Err(start_error(err)),
            // The guard kills the group as it drops.
            Err(_) => {
                return Err(PluginError::Timeout {
                    command: command_name,
                    user: user.to_owned(),
                    timeout,
                })
            }
        };
        guard.disarm();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr = stderr.trim();
            let cut = stderr
                .char_indices()
                .rev()
                .nth(STDERR_QUOTED)
                .map_or(0, |(at, _)| at);
            return Err(PluginError::Failed {
                command: command_name,
                user: user.to_owned(),
                status: output.status.to_string(),
                stderr: stderr[cut..].to_owned(),
            });
        }
        parse_credentials(&output.stdout).map_err(|source| PluginError::Output {
            command: command_name,
            user: user.to_owned(),
            source,
        })
    }
}

/// Why a credential process did not start.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    #[error("the agent is stopping")]
    Stopping,
    #[error(transparent)]
    Io(std::io::Error),
}

/// An `ExecCredential`'s status, as client-go reads it.
fn parse_credentials(stdout: &[u8]) -> Result<PluginCredentials, ExecCredentialError> {
    #[derive(serde::Deserialize)]
    struct ExecCredential {
        status: Option<Status>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Status {
        token: Option<String>,
        expiration_timestamp: Option<String>,
        client_certificate_data: Option<String>,
        client_key_data: Option<String>,
    }
    let credential: ExecCredential =
        serde_json::from_slice(stdout).map_err(|err| ExecCredentialError::Json(Arc::new(err)))?;
    let status = credential.status.ok_or(ExecCredentialError::NoStatus)?;
    let expires = status
        .expiration_timestamp
        .as_deref()
        .map(|at| {
            DateTime::parse_from_rfc3339(at)
                .map(|at| at.with_timezone(&Utc))
                .map_err(|source| ExecCredentialError::Expiration {
                    at: at.to_owned(),
                    source,
                })
        })
        .transpose()?;
    let credentials = PluginCredentials {
        token: status.token.filter(|token| !token.is_empty()),
        expires,
        client_certificate: status.client_certificate_data,
        client_key: status.client_key_data,
    };
    let has_certificate =
        credentials.client_certificate.is_some() && credentials.client_key.is_some();
    if credentials.token.is_none() && !has_certificate {
        return Err(ExecCredentialError::NothingUsable);
    }
    Ok(credentials)
}

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

    /// A plugin script in `dir` that starts a helper, notes both ids in
    /// `pids`, and waits for ever.
    fn hanging_plugin(dir: &Path) -> (ExecConfig, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let pids = dir.join("pids");
        let plugin = dir.join("hanging");
        std::fs::write(
            &plugin,
            format!(
                "#!/bin/sh\nsleep 1000 &\necho \"$$ $!\" > '{}'\nwait\n",
                pids.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let exec = ExecConfig {
            command: Some(plugin.display().to_string()),
            ..ExecConfig::default()
        };
        (exec, pids)
    }

    /// The ids `pids` names, once the plugin wrote them.
    async fn written_ids(pids: &Path) -> Vec<i32> {
        for _ in 0..500 {
            let ids: Vec<i32> = std::fs::read_to_string(pids)
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|id| id.parse().ok())
                .collect();
            if ids.len() == 2 {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the plugin never wrote its ids");
    }

    /// Waits until no process with these ids runs (zombies run no more).
    async fn all_gone(ids: &[i32]) -> bool {
        for _ in 0..500 {
            let running = ids.iter().any(|id| {
                std::fs::read_to_string(format!("/proc/{id}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next())
                        .is_some_and(|state| state != "Z" && state != "X")
                })
            });
            if !running {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_plugin_past_its_deadline_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().expect("dir");
        let (exec, pids) = hanging_plugin(dir.path());
        let processes = CredentialProcesses::default();
        let err = processes
            .run_plugin("dev", &exec, Duration::from_millis(500))
            .await
            .expect_err("it never answers");
        assert!(matches!(err, PluginError::Timeout { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("credential plugin did not answer in 0 s"),
            "{err}"
        );
        let ids = written_ids(&pids).await;
        assert!(all_gone(&ids).await, "{ids:?} still run");
    }

    #[tokio::test]
    async fn stopping_kills_a_running_plugin_and_starts_no_more() {
        let dir = tempfile::tempdir().expect("dir");
        let (exec, pids) = hanging_plugin(dir.path());
        let processes = std::sync::Arc::new(CredentialProcesses::default());
        let running = {
            let processes = std::sync::Arc::clone(&processes);
            let exec = exec.clone();
            tokio::spawn(async move {
                processes
                    .run_plugin("dev", &exec, Duration::from_secs(600))
                    .await
            })
        };
        let ids = written_ids(&pids).await;
        processes.stop();
        assert!(all_gone(&ids).await, "{ids:?} still run");
        let ended = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the run ends with its plugin")
            .expect("task");
        assert!(ended.is_err());
        assert!(matches!(
            processes
                .run_plugin("dev", &exec, Duration::from_secs(600))
                .await,
            Err(PluginError::Stopping)
        ));
    }

    #[test]
    fn an_exec_credential_is_read_as_client_go_reads_it() {
        let credentials = parse_credentials(
            br#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",
                "status":{"token":"tok","expirationTimestamp":"2030-01-02T03:04:05Z"}}"#,
        )
        .expect("credentials");
        assert_eq!(credentials.token.as_deref(), Some("tok"));
        assert_eq!(
            credentials.expires.map(|at| at.to_rfc3339()),
            Some("2030-01-02T03:04:05+00:00".to_owned())
        );
        let why = parse_credentials(br#"{"status":{}}"#).expect_err("nothing usable");
        assert!(why.to_string().contains("neither a token"), "{why}");
        assert!(matches!(why, ExecCredentialError::NothingUsable));
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
