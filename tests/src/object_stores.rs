//! Real object-store servers on loopback ports of their own, for the
//! anchor (RFD 0005, RFD 0010): the S3 API of `moto` in server mode,
//! Azure Blob through Microsoft's Azurite, and Google Cloud Storage through
//! `gcp-storage-emulator` (installed by scripts/install-test-deps.sh). Each
//! gives the anchor's URL and the object_store options that reach it, with
//! explicit endpoint and credentials: nothing here may fall back to a cloud
//! metadata address.

use std::path::Path;
use std::process::Command;

use crate::free_port;
use crate::Proc;

/// The bucket (or container) every server is started with.
pub const BUCKET: &str = "grantline";

/// Azurite's well-known development account (public, from its docs).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct ObjectServer {
    pub kind: &'static str,
    proc: Proc,
    /// The anchor's URL: the bucket and `prefix`.
    pub url: String,
    /// object_store options (`aws_endpoint`, …) that reach the server.
    pub options: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

fn python() -> Command {
    Command::new("python3")
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl ObjectServer {
    /// The S3 API of moto in server mode, with bucket [`BUCKET`].
    pub fn moto(prefix: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut proc = Proc::spawn(
            "moto",
            Command::new("sh").arg("-c").arg(format!("exec python3 -m moto.server -H 127.0.0.1 -p {port} 2>&1")),
        );
        proc.wait_line_containing("Running on");
        let endpoint = format!("http://127.0.0.1:{port}");
        run(
            python().arg("-c").arg(format!(
                "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='grantline', \
                 aws_secret_access_key='grantline-secret', region_name='us-east-1').create_bucket(Bucket='{BUCKET}')"
            )),
            "creating the moto bucket",
        );
        let options = [
            ("aws_access_key_id", "grantline"),
            ("aws_secret_access_key", "grantline-secret"),
            ("aws_region", "us-east-1"),
            ("aws_endpoint", endpoint.as_str()),
            ("aws_allow_http", "true"),
        ];
        Self::new("moto", proc, format!("s3://{BUCKET}/{prefix}"), &options, dir)
    }

    /// Azure Blob through Azurite, with container [`BUCKET`].
    pub fn azurite(prefix: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut proc = Proc::spawn(
            "azurite",
            Command::new("sh").arg("-c").arg(format!(
                "exec azurite-blob --blobHost 127.0.0.1 --blobPort {port} --location {} --skipApiVersionCheck --disableTelemetry --silent 2>&1",
                dir.path().display()
            )),
        );
        proc.wait_line_containing("successfully listens");
        let endpoint = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}");
        run(
            python().arg("-c").arg(format!(
                "from azure.storage.blob import BlobServiceClient; BlobServiceClient.from_connection_string(\
                 'DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
                 BlobEndpoint={endpoint};').create_container('{BUCKET}')"
            )),
            "creating the Azurite container",
        );
        let options = [
            ("azure_storage_account_name", AZURITE_ACCOUNT),
            ("azure_storage_account_key", AZURITE_KEY),
            ("azure_storage_endpoint", endpoint.as_str()),
            ("azure_allow_http", "true"),
        ];
        Self::new("azurite", proc, format!("az://{BUCKET}/{prefix}"), &options, dir)
    }

    /// Google Cloud Storage through gcp-storage-emulator, with bucket
    /// [`BUCKET`]; object_store reaches it with OAuth disabled.
    pub fn gcs(prefix: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut proc = Proc::spawn(
            "gcp-storage-emulator",
            Command::new("sh").arg("-c").arg(format!(
                "exec python3 -m gcp_storage_emulator start --host 127.0.0.1 --port {port} \
                 --default-bucket {BUCKET} --in-memory 2>&1"
            )),
        );
        proc.wait_line_containing("All services started");
        let endpoint = format!("http://127.0.0.1:{port}");
        let key = serde_json::json!({"gcs_base_url": endpoint, "disable_oauth": true,
            "client_email": "", "private_key": "", "private_key_id": ""})
        .to_string();
        let options = [("google_service_account_key", key.as_str()), ("google_allow_http", "true")];
        Self::new("gcp-storage-emulator", proc, format!("gs://{BUCKET}/{prefix}"), &options, dir)
    }

    fn new(kind: &'static str, proc: Proc, url: String, options: &[(&str, &str)], dir: tempfile::TempDir) -> Self {
        let options = options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self { kind, proc, url, options, _dir: dir }
    }

    /// Writes the options as an anchor options file (0600), `KEY=VALUE`.
    pub fn write_options_file(&self, path: &Path) {
        let text: String = self.options.iter().map(|(k, v)| format!("{}={v}\n", k.to_ascii_uppercase())).collect();
        grantline_proto::files::write_secret(path, text.as_bytes()).unwrap();
    }

    /// The object store itself, as a second writer of the anchor would reach it.
    pub fn store(&self) -> (Box<dyn object_store::ObjectStore>, object_store::path::Path) {
        object_store::parse_url_opts(&url::Url::parse(&self.url).unwrap(), self.options.clone()).unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }
}
