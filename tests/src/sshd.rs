//! A real `sshd` on a loopback port of its own that trusts one user CA.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::openbao::free_port;
use crate::Proc;

pub struct Sshd {
    pub proc: Proc,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Sshd {
    /// Starts sshd accepting user certificates signed by `ca_pub`.
    pub fn start(ca_pub: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host_key = dir.path().join("host_ed25519");
        let keygen =
            Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&host_key).output().unwrap();
        assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
        std::fs::write(dir.path().join("user_ca.pub"), format!("{ca_pub}\n")).unwrap();
        // sshd wants its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nTrustedUserCAKeys {}\n\
                 AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
                host_key.display(),
                dir.path().join("sshd.pid").display(),
                dir.path().join("user_ca.pub").display()
            ),
        )
        .unwrap();
        let sshd = which_sshd();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!("exec {} -D -e -f {} 2>&1", sshd.display(), config.display()));
        let mut proc = Proc::spawn("sshd", &mut cmd);
        proc.wait_line_containing("Server listening on 127.0.0.1");
        Self { proc, port, dir }
    }

    /// `ssh user@127.0.0.1 true` with the key and its certificate.
    pub fn login(&self, user: &str, key: &Path, cert: &Path) -> Output {
        Command::new("ssh")
            .args(["-p", &self.port.to_string(), "-i"])
            .arg(key)
            .arg("-o")
            .arg(format!("CertificateFile={}", cert.display()))
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "ConnectTimeout=5",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.dir.path().join("known_hosts").display()))
            .arg(format!("{user}@127.0.0.1"))
            .arg("true")
            .output()
            .unwrap()
    }
}

fn which_sshd() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/bin/sshd"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("sshd is not installed: run scripts/install-test-deps.sh (openssh-server)");
}
