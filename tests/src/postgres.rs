//! A real PostgreSQL server in a temporary directory, on a loopback port of
//! its own, for Vault's database secrets engine.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::free_port;
use crate::Proc;

pub const SUPERUSER_PASSWORD: &str = "grantline-test-superuser";

fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/install-test-deps.sh")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

/// PostgreSQL refuses to run as root; when we are root, run it as `postgres`.
fn as_server_user(program: &Path) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub struct Postgres {
    pub proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// `postgres://` URL of the superuser (the fleet tests' database).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown) and waits until it is gone.
    pub fn stop(&mut self) {
        self.proc.signal(nix::sys::signal::Signal::SIGINT);
        assert!(self.proc.wait_at_most(std::time::Duration::from_secs(30)).is_some(), "postgres did not stop");
    }

    /// Starts it again on the same data and port, after `stop`.
    pub fn start_again(&mut self) {
        let mut proc = Proc::spawn("postgres", &mut self.server_command());
        proc.wait_line_containing("database system is ready to accept connections");
        self.proc = proc;
    }

    fn server_command(&self) -> Command {
        let mut cmd = as_server_user(Path::new("/bin/sh"));
        cmd.arg("-c").arg(format!(
            "exec {} -D {} -p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off 2>&1",
            bin_dir().join("postgres").display(),
            self._dir.path().join("data").display(),
            self.port,
            self._dir.path().display()
        ));
        cmd
    }
}

impl Postgres {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("the postgres user (from the postgresql package)");
            nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
            nix::unistd::chown(&pwfile, Some(pg.uid), Some(pg.gid)).unwrap();
        }
        let bin = bin_dir();
        let init = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "--pwfile"])
            .arg(&pwfile)
            .output()
            .unwrap();
        assert!(init.status.success(), "initdb failed: {}", String::from_utf8_lossy(&init.stderr));
        let port = free_port();
        // Logs go to stdout so that readiness can be read from them.
        let mut cmd = as_server_user(Path::new("/bin/sh"));
        cmd.arg("-c").arg(format!(
            "exec {} -D {} -p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off 2>&1",
            bin.join("postgres").display(),
            data.display(),
            dir.path().display()
        ));
        let mut proc = Proc::spawn("postgres", &mut cmd);
        proc.wait_line_containing("database system is ready to accept connections");
        Self { proc, port, _dir: dir }
    }

    /// Runs `psql` as `user` with `password` over TCP; returns its output.
    pub fn psql(&self, user: &str, password: &str, sql: &str) -> std::process::Output {
        Command::new("psql")
            .arg(format!("postgresql://{user}@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=5", self.port))
            .args(["-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
    }
}
