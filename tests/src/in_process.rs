//! A dev broker run by the test process itself, on its own runtime: the
//! library's `Broker::open` and `Broker::run` with a shutdown handle, as
//! `grantlined dev` calls them, so a test reaches the grant path without a
//! release binary of the broker.

use std::path::Path;
use std::time::Duration;

use grantline_daemon::config;
use grantline_daemon::server::Broker;

use crate::BrokerSide;

/// A dev broker in this process, in a temporary state directory; dropping
/// it shuts it down and waits until its log is closed.
pub struct InProcessBroker {
    dir: tempfile::TempDir,
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessBroker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        config::prepare_dev_dir(dir.path()).unwrap();
        let opts =
            config::dev_options(dir.path(), "127.0.0.1:0", "127.0.0.1:0", Duration::from_secs(24 * 3600)).unwrap();
        let (listening, addr) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            // One thread is enough, and shows that nothing in the broker needs a
            // multi-threaded runtime (it once called `block_in_place`).
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let broker = Broker::open(&opts).await?;
                listening.send(broker.local_addr()?.to_string())?;
                broker
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
            })
        });
        let Ok(addr) = addr.recv_timeout(Duration::from_secs(60)) else {
            let failure = thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")));
            panic!("the in-process broker did not start: {failure:?}");
        };
        Self { dir, addr, stop: Some(stop), thread: Some(thread) }
    }

    /// Shuts the broker down as a SIGTERM would, waits for it, and says how
    /// it ended; its state directory stays until the value is dropped.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the in-process broker panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcessBroker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl BrokerSide for InProcessBroker {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn state_dir(&self) -> &Path {
        self.dir.path()
    }
}
