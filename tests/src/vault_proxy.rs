//! A loopback TCP proxy in front of OpenBao that can hold back or alter the
//! answer to requests on one API path, to show how the broker copes with a
//! slow Vault, or with an answer it cannot use, from a real server.
//!
//! It relays bytes: the first chunk Vault sends after a request whose bytes
//! name `path` is the one delayed or altered (OpenBao writes a small JSON
//! answer, headers and body, in one write).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to the answer of a request on `path`.
#[derive(Clone, Default)]
pub struct Fault {
    pub path: String,
    pub delay: Duration,
    /// Byte strings replaced by others of the same length (so that
    /// Content-Length still holds).
    pub replace: Vec<(String, String)>,
}

pub struct VaultProxy {
    pub addr: String,
    fault: Arc<Mutex<Fault>>,
    /// Answers to `path` relayed so far.
    hits: Arc<AtomicUsize>,
}

impl VaultProxy {
    /// Starts relaying to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let fault = Arc::new(Mutex::new(Fault::default()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (f, h) = (fault.clone(), hits.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                relay(client, server, f.clone(), h.clone());
            }
        });
        Self { addr, fault, hits }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// How many answers to the fault's path have been relayed.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn relay(client: TcpStream, server: TcpStream, fault: Arc<Mutex<Fault>>, hits: Arc<AtomicUsize>) {
    let marked = Arc::new(AtomicBool::new(false));
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (m, f) = (marked.clone(), fault.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match c_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let path = f.lock().unwrap().path.clone();
            if !path.is_empty() && buf[..n].windows(path.len()).any(|w| w == path.as_bytes()) {
                m.store(true, Ordering::SeqCst);
            }
            if s_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match s_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = buf[..n].to_vec();
            if marked.swap(false, Ordering::SeqCst) {
                let fault = fault.lock().unwrap().clone();
                std::thread::sleep(fault.delay);
                for (from, to) in &fault.replace {
                    assert_eq!(from.len(), to.len(), "a replacement must keep the length");
                    let mut at = 0;
                    while let Some(i) = chunk[at..].windows(from.len()).position(|w| w == from.as_bytes()) {
                        chunk[at + i..at + i + to.len()].copy_from_slice(to.as_bytes());
                        at += i + to.len();
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
            }
            if c_write.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = c_write.shutdown(Shutdown::Both);
    });
}
