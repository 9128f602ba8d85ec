//! State on disk, in the state dir: the agent id and bearer token (small files,
//! made once), and the pods with their ports and forwarding toggles (SQLite,
//! so every acknowledged push survives a `kill -9` and a restart brings back
//! every tunnel).

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use crate::model::{PodSpec, StagingVia, TunnelTarget};
use crate::state::fsio;

const AGENT_ID_FILE: &str = "agent-id";
const TOKEN_FILE: &str = "token";
const DB_FILE: &str = "state.db";

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot use state dir {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot read or write {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{path} is empty or unreadable text; remove it to make a new one")]
    BadFile { path: PathBuf },
    #[error("state database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("stored pod {id} is unreadable: {source}")]
    BadPod {
        id: String,
        source: serde_json::Error,
    },
    #[error("state database task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("refusing to use {path}: {why}")]
    NotOurs { path: PathBuf, why: fsio::NotOurs },
}

/// Who this agent is: made once, then read back on every start.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent_id: String,
    pub token: String,
}

impl Identity {
    /// Reads the id and token from `state_dir`, making whichever is missing.
    /// An id given in the settings wins over (and replaces) the stored one.
    pub fn load_or_create(
        state_dir: &Path,
        configured_id: Option<&str>,
    ) -> Result<Self, PersistError> {
        ensure_dir(state_dir)?;
        let id_path = state_dir.join(AGENT_ID_FILE);
        let agent_id = match configured_id {
            Some(id) => {
                if read_trimmed(&id_path)?.as_deref() != Some(id) {
                    write_file(&id_path, id, 0o644)?;
                }
                id.to_owned()
            }
            None => match read_trimmed(&id_path)? {
                Some(id) => id,
                None => {
                    let id = new_agent_id();
                    write_file(&id_path, &id, 0o644)?;
                    id
                }
            },
        };
        let token_path = state_dir.join(TOKEN_FILE);
        let token = match read_trimmed(&token_path)? {
            Some(token) => token,
            None => {
                let token = new_token().map_err(|source| PersistError::File {
                    path: token_path.clone(),
                    source,
                })?;
                write_file(&token_path, &token, 0o600)?;
                token
            }
        };
        Ok(Self { agent_id, token })
    }

    /// The token as stored in `state_dir`, for the CLI's `token` command.
    pub fn read_token(state_dir: &Path) -> Result<String, PersistError> {
        let path = state_dir.join(TOKEN_FILE);
        read_trimmed(&path)?.ok_or(PersistError::BadFile { path })
    }
}

/// `staging-agent-<hostname>-<unix time>`, the seed's format.
fn new_agent_id() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("staging-agent-{host}-{}", chrono::Utc::now().timestamp())
}

/// 32 random bytes from the OS, hex-encoded.
fn new_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|err| io::Error::other(err.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates the state dir owner-only (0700). One that already exists is not
/// changed (it may be a directory the user shares), only warned about when
/// others can look inside.
fn ensure_dir(dir: &Path) -> Result<(), PersistError> {
    fsio::create_private_dir(dir).map_err(|source| PersistError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    // A folder someone else owns (or anyone may write to) could hold files
    // planted for us: a link to a victim file, a token of theirs.
    fsio::check_own_dir(dir).map_err(|why| PersistError::NotOurs {
        path: dir.to_owned(),
        why,
    })?;
    if let Some(mode) = fsio::mode_of(dir).filter(|mode| mode & 0o077 != 0) {
        tracing::warn!(
            path = %dir.display(),
            mode = format!("{mode:o}"),
            "the state directory is open to other users; `chmod 700` it to keep the token private"
        );
    }
    Ok(())
}

/// Reads one of our small files, trimmed; refused when it is not ours or a
/// link (checked on the open descriptor).
fn read_trimmed(path: &Path) -> Result<Option<String>, PersistError> {
    let file_err = |source| PersistError::File {
        path: path.to_owned(),
        source,
    };
    let file = match fsio::open_own(path).map_err(file_err)? {
        None => return Ok(None),
        Some(Err(why)) => {
            return Err(PersistError::NotOurs {
                path: path.to_owned(),
                why,
            })
        }
        Some(Ok(file)) => file,
    };
    let mut text = String::new();
    io::Read::read_to_string(&mut &file, &mut text).map_err(file_err)?;
    Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty()))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PersistError> {
    fsio::atomic_replace(path, format!("{text}\n").as_bytes(), mode).map_err(|source| {
        PersistError::File {
            path: path.to_owned(),
            source,
        }
    })
}

/// The desktop app's own preferences, kept beside the agent's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DesktopSettings {
    #[serde(default)]
    pub notifications_muted: bool,
    /// The window stays open when it loses focus.
    #[serde(default)]
    pub pinned: bool,
    /// The window's size as the user last left it (logical pixels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<WindowSize>,
}

/// A window's inner size in logical pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSize {
    pub width: u32,
    pub height: u32,
}

const DESKTOP_SETTINGS_FILE: &str = "desktop.json";

impl DesktopSettings {
    /// The stored settings; defaults when none were saved (or the file is unreadable,
    /// which only costs a preference).
    pub fn load(state_dir: &Path) -> Self {
        read_trimmed(&state_dir.join(DESKTOP_SETTINGS_FILE))
            .ok()
            .flatten()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), PersistError> {
        ensure_dir(state_dir)?;
        let path = state_dir.join(DESKTOP_SETTINGS_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|err| PersistError::File {
            path: path.clone(),
            source: io::Error::other(err.to_string()),
        })?;
        write_file(&path, &text, 0o644)
    }
}

/// What is kept of one port of a pod, on disk and after the port left the
/// pod: its range port and its toggle, so it gets both back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RememberedPort {
    pub staging_port: u16,
    pub local_port: Option<u16>,
    pub forwarding: bool,
}

/// A pod as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPod {
    pub spec: PodSpec,
    /// The primary port's range port and toggle (also in `ports`; kept in
    /// their own columns, as before ports had tunnels of their own).
    pub local_port: Option<u16>,
    pub forwarding: bool,
    pub target: TunnelTarget,
    /// How a `staging` target is reached, when the pod was given its own
    /// way (else the agent's `--staging-via`).
    pub via: Option<StagingVia>,
    /// The pod's own loopback address, when it has one.
    pub address: Option<Ipv4Addr>,
    /// Every port's range port and toggle, also of ports that left the pod.
    pub ports: Vec<RememberedPort>,
}

/// The pods database. Cheap to clone; calls run on the blocking pool.
#[derive(Debug, Clone)]
pub struct StateDb {
    path: PathBuf,
    conn: Arc<parking_lot::Mutex<Connection>>,
}

impl StateDb {
    /// Opens (creating when new) `<state_dir>/state.db`.
    pub fn open(state_dir: &Path) -> Result<Self, PersistError> {
        ensure_dir(state_dir)?;
        let path = state_dir.join(DB_FILE);
        // The database and its journal files are opened by path (SQLite's
        // own open): each must be ours and not a link before it is.
        for file in [DB_FILE, "state.db-wal", "state.db-shm"] {
            let file = state_dir.join(file);
            match fsio::check_own_file(&file) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(PersistError::NotOurs { path: file, why }),
                Err(source) => return Err(PersistError::File { path: file, source }),
            }
        }
        let db_err = |source| PersistError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db_err)?;
        // Owner-only before the first write: SQLite gives the WAL and shared
        // memory files the database file's permissions.
        fsio::make_private(&path).map_err(|source| PersistError::File {
            path: path.clone(),
            source,
        })?;
        // WAL with NORMAL sync survives a process crash (kill -9) with every
        // committed transaction, at a fraction of FULL's fsync cost.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS pods (
                 id         TEXT PRIMARY KEY,
                 spec       TEXT NOT NULL,
                 local_port INTEGER,
                 forwarding INTEGER NOT NULL DEFAULT 1
             );",
        )
        .map_err(db_err)?;
        // Added after the first release: older state dirs get the columns.
        for (column, definition) in [
            ("target", "target TEXT NOT NULL DEFAULT 'staging'"),
            ("address", "address TEXT"),
            ("ports", "ports TEXT"),
            ("via", "via TEXT"),
        ] {
            let present: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('pods') WHERE name = ?1")
                .and_then(|mut stmt| stmt.exists([column]))
                .map_err(db_err)?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE pods ADD COLUMN {definition};"))
                    .map_err(db_err)?;
            }
        }
        Ok(Self {
            path,
            conn: Arc::new(parking_lot::Mutex::new(conn)),
        })
    }

    /// Runs `work` on the connection on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, PersistError> {
        let conn = Arc::clone(&self.conn);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A panic in an earlier `work` leaves no transaction open (it
            // rolls back on drop), so the connection is fine to use again.
            let mut guard = conn.lock();
            work(&mut guard).map_err(|source| PersistError::Db { path, source })
        })
        .await
        .map_err(PersistError::Task)?
    }

    /// Every stored pod, in id order.
    pub async fn load(&self) -> Result<Vec<StoredPod>, PersistError> {
        let rows = self
            .with_conn(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT id, spec, local_port, forwarding, target, address, ports, via \
                     FROM pods ORDER BY id",
                )?;
                let rows = stmt.query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<u16>>(2)?,
                        row.get::<_, bool>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, Option<String>>(5)?,
                        row.get::<_, Option<String>>(6)?,
                        row.get::<_, Option<String>>(7)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(
                |(id, spec, local_port, forwarding, target, address, ports, via)| {
                    let spec: PodSpec = serde_json::from_str(&spec)
                        .map_err(|err| PersistError::BadPod { id, source: err })?;
                    // Saved before ports had tunnels of their own (or unreadable):
                    // the primary port's columns are all there is.
                    let ports = ports
                        .and_then(|text| serde_json::from_str(&text).ok())
                        .unwrap_or_else(|| {
                            vec![RememberedPort {
                                staging_port: spec.staging_port(),
                                local_port,
                                forwarding,
                            }]
                        });
                    Ok(StoredPod {
                        ports,
                        // An unknown way (a newer agent's) is forgotten: the default.
                        via: via.and_then(|text| text.parse().ok()),
                        spec,
                        local_port,
                        forwarding,
                        target: TunnelTarget::parse(&target).unwrap_or_default(),
                        // An unreadable address is forgotten: the pod gets a new one.
                        address: address.and_then(|text| text.parse().ok()),
                    })
                },
            )
            .collect()
    }

    /// Writes `upserts` and removes `removals` in one transaction.
    pub async fn save(
        &self,
        upserts: Vec<StoredPod>,
        removals: Vec<String>,
    ) -> Result<(), PersistError> {
        let encoded = upserts
            .into_iter()
            .map(|pod| {
                let spec =
                    serde_json::to_string(&pod.spec).map_err(|err| PersistError::BadPod {
                        id: pod.spec.id.clone(),
                        source: err,
                    })?;
                let ports =
                    serde_json::to_string(&pod.ports).map_err(|err| PersistError::BadPod {
                        id: pod.spec.id.clone(),
                        source: err,
                    })?;
                Ok((
                    pod.spec.id,
                    spec,
                    pod.local_port,
                    pod.forwarding,
                    pod.target.as_str(),
                    pod.address.map(|ip| ip.to_string()),
                    ports,
                    pod.via.map(StagingVia::as_str),
                ))
            })
            .collect::<Result<Vec<_>, PersistError>>()?;
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO pods (id, spec, local_port, forwarding, target, address, ports, via)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(id) DO UPDATE SET spec = excluded.spec,
                         local_port = excluded.local_port, forwarding = excluded.forwarding,
                         target = excluded.target, address = excluded.address,
                         ports = excluded.ports, via = excluded.via",
                )?;
                for (id, spec, port, forwarding, target, address, ports, via) in &encoded {
                    upsert.execute(params![
                        id, spec, port, forwarding, target, address, ports, via
                    ])?;
                }
                let mut delete = tx.prepare_cached("DELETE FROM pods WHERE id = ?1")?;
                for id in &removals {
                    delete.execute(params![id])?;
                }
            }
            tx.commit()
        })
        .await
    }

    /// The stored forwarding toggle of one pod, if it is stored.
    pub async fn forwarding_of(&self, id: &str) -> Result<Option<bool>, PersistError> {
        let id = id.to_owned();
        self.with_conn(move |conn| {
            conn.query_row("SELECT forwarding FROM pods WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_pod;

    /// The cause stays a source (logs and `doctor` print the chain) and
    /// the text still says it, as the API's error bodies show it.
    #[test]
    fn an_unreadable_pod_keeps_its_cause_as_the_source() {
        let cause = serde_json::from_str::<PodSpec>("{").expect_err("not JSON");
        let text = cause.to_string();
        let err = PersistError::BadPod {
            id: "web".to_owned(),
            source: cause,
        };
        assert_eq!(
            err.to_string(),
            format!("stored pod web is unreadable: {text}")
        );
        let source = std::error::Error::source(&err).expect("a source");
        assert_eq!(source.to_string(), text);
    }

    #[test]
    fn identity_is_made_once_and_token_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path(), None).expect("create");
        assert!(first.agent_id.starts_with("staging-agent-"));
        assert_eq!(first.token.len(), 64);
        let again = Identity::load_or_create(dir.path(), None).expect("load");
        assert_eq!(again.agent_id, first.agent_id);
        assert_eq!(again.token, first.token);
        assert_eq!(
            Identity::read_token(dir.path()).expect("token"),
            first.token
        );
        #[cfg(unix)]
        assert_eq!(fsio::mode_of(&dir.path().join(TOKEN_FILE)), Some(0o600));
        // A state dir the agent creates is its owner's alone, and so is the
        // database in it.
        let fresh = dir.path().join("new/state");
        StateDb::open(&fresh).expect("db");
        #[cfg(unix)]
        {
            assert_eq!(fsio::mode_of(&fresh), Some(0o700));
            assert_eq!(fsio::mode_of(&fresh.join(DB_FILE)), Some(0o600));
        }
        let named = Identity::load_or_create(dir.path(), Some("agent-x")).expect("named");
        assert_eq!(named.agent_id, "agent-x");
    }

    #[test]
    fn desktop_settings_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            DesktopSettings::load(dir.path()),
            DesktopSettings::default()
        );
        let muted = DesktopSettings {
            notifications_muted: true,
            pinned: true,
            window_size: Some(WindowSize {
                width: 520,
                height: 700,
            }),
        };
        muted.save(dir.path()).expect("save");
        assert_eq!(DesktopSettings::load(dir.path()), muted);
    }

    #[tokio::test]
    async fn pods_round_trip_through_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = StateDb::open(dir.path()).expect("open");
        let spec = parse_pod(
            0,
            serde_json::json!({"id":"p1","name":"a","ip":"10.0.0.1","port":8080}),
        )
        .expect("pod");
        let stored = StoredPod {
            spec,
            local_port: Some(8085),
            forwarding: false,
            target: TunnelTarget::Local,
            via: Some(StagingVia::Api),
            address: Some(Ipv4Addr::new(127, 77, 0, 9)),
            ports: vec![
                RememberedPort {
                    staging_port: 8080,
                    local_port: Some(8085),
                    forwarding: false,
                },
                // A port that left the pod keeps its number for its return.
                RememberedPort {
                    staging_port: 9090,
                    local_port: Some(8086),
                    forwarding: true,
                },
            ],
        };
        db.save(vec![stored.clone()], vec![]).await.expect("save");
        drop(db);
        let db = StateDb::open(dir.path()).expect("reopen");
        assert_eq!(db.load().await.expect("load"), vec![stored]);
        assert_eq!(db.forwarding_of("p1").await.expect("query"), Some(false));
        db.save(vec![], vec!["p1".into()]).await.expect("delete");
        assert!(db.load().await.expect("load").is_empty());
    }
}
