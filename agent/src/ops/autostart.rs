//! Start at login: the desktop app's XDG autostart entry
//! (`$XDG_CONFIG_HOME/autostart/k3s-local-agent.desktop`). The entry's
//! presence is the setting, so it is remembered across restarts and a user
//! who removes the file by hand has turned it off.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The entry's file name in the autostart folder.
pub const ENTRY_NAME: &str = "k3s-local-agent.desktop";

/// The autostart folder of this user: `$XDG_CONFIG_HOME/autostart`, else
/// `~/.config/autostart`.
pub fn autostart_dir() -> Option<PathBuf> {
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(dirs::config_dir)?;
    Some(config_home.join("autostart"))
}

/// Whether the app starts at login (the entry exists in `dir`).
pub fn is_enabled(dir: &Path) -> bool {
    dir.join(ENTRY_NAME).is_file()
}

/// Makes the app start at login: writes the entry that runs `exe`.
pub fn enable(dir: &Path, exe: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    crate::state::fsio::atomic_replace(&dir.join(ENTRY_NAME), render(exe).as_bytes(), 0o644)
}

/// Stops the app from starting at login: removes the entry.
pub fn disable(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(ENTRY_NAME)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// The entry that starts `exe` at login.
pub fn render(exe: &Path) -> String {
    format!(
        "[Desktop Entry]\n\
         Type=Application\n\
         Name=K3s Local Agent\n\
         Comment=Staging pods on this machine, by name, in the tray\n\
         Exec={}\n\
         Icon=k3s-local-agent-tray\n\
         Terminal=false\n\
         X-GNOME-Autostart-enabled=true\n",
        exec_argument(&exe.display().to_string())
    )
}

/// One argument of an `Exec=` line, as the Desktop Entry Specification
/// wants it: quoted when it holds a reserved character (a path with a
/// space), with `"`, `` ` ``, `$` and `\` escaped inside the quotes, and
/// then every `\` doubled again because the value is itself an escaped
/// string.
fn exec_argument(arg: &str) -> String {
    const RESERVED: &[char] = &[
        ' ', '\t', '\n', '"', '\'', '\\', '>', '<', '~', '|', '&', ';', '$', '*', '?', '#', '(',
        ')', '`',
    ];
    let quoted = if arg.contains(RESERVED) {
        let mut out = String::from("\"");
        for ch in arg.chars() {
            if matches!(ch, '"' | '`' | '$' | '\\') {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
        out
    } else {
        arg.to_owned()
    };
    // Percent signs are field codes unless doubled.
    quoted.replace('\\', "\\\\").replace('%', "%%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_writes_an_entry_and_disable_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let autostart = dir.path().join("autostart");
        assert!(!is_enabled(&autostart));
        enable(&autostart, Path::new("/usr/bin/k3s-local-agent-tray")).expect("enable");
        assert!(is_enabled(&autostart));
        let text = fs::read_to_string(autostart.join(ENTRY_NAME)).expect("read");
        assert!(
            text.contains("\nExec=/usr/bin/k3s-local-agent-tray\n"),
            "{text}"
        );
        disable(&autostart).expect("disable");
        assert!(!is_enabled(&autostart));
        disable(&autostart).expect("disabling twice is fine");
    }

    #[test]
    fn paths_with_spaces_and_specials_are_quoted_as_the_spec_says() {
        assert_eq!(
            exec_argument("/opt/K3s Agent/tray"),
            "\"/opt/K3s Agent/tray\""
        );
        assert_eq!(exec_argument("/a/$b"), "\"/a/\\\\$b\"");
        assert_eq!(exec_argument("/a/100%"), "/a/100%%");
    }
}
