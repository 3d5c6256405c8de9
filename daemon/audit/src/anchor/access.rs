//! How an anchor's object store is reached: its options (object_store's
//! configuration keys, from the environment and an options file), and the
//! rule that no anchor reaches a cloud metadata address unless asked to.
//!
//! object_store falls back to the instance metadata service (169.254.169.254,
//! or the container credentials address) when a cloud URL comes without
//! credentials. On a machine outside that cloud this hangs on retries; on one
//! inside, it silently uses whatever role the machine has. So an `s3://`,
//! `gs://` or `az://` anchor without credentials is refused at once, naming
//! what to set, unless `instance_credentials` asks for the metadata service.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use object_store::aws::AmazonS3ConfigKey as S3;
use object_store::azure::AzureConfigKey as Az;
use object_store::gcp::GoogleConfigKey as Gcs;
use object_store::ObjectStoreScheme;

/// How an anchor may be reached, besides its URL.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Credentials may come from the machine's cloud metadata service.
    pub instance_credentials: bool,
    /// A file of object_store options, `KEY=VALUE` a line (the names of
    /// the environment variables: `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`,
    /// `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`, …); it
    /// holds credentials, so it must be 0600. Its values override the
    /// environment's.
    pub options_file: Option<PathBuf>,
}

/// The prefixes of the environment variables that configure object_store.
const PREFIXES: [&str; 4] = ["aws_", "google_", "azure_", "object_store_"];

/// The most options an options file may hold.
const MAX_OPTIONS: usize = 256;

impl Access {
    /// The options for object_store: the environment's, then the file's.
    pub(crate) fn options(&self) -> Result<Vec<(String, String)>> {
        // A variable that is not UTF-8 is not one of object_store's.
        let mut options: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?.to_ascii_lowercase(), v.into_string().ok()?)))
            .filter(|(k, _)| PREFIXES.iter().any(|p| k.starts_with(p)))
            .collect();
        if let Some(path) = &self.options_file {
            options.extend(read_options(path)?);
        }
        Ok(options)
    }
}

/// Reads an options file: 0600, and owned by this user or root (whoever
/// owns it chooses where the log goes and with which credentials).
fn read_options(path: &Path) -> Result<Vec<(String, String)>> {
    use std::os::unix::fs::MetadataExt;
    let what = || format!("cannot read the anchor's options file {}", path.display());
    let owner = std::fs::metadata(path).with_context(what)?.uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != me && owner != 0 {
        bail!("the anchor's options file {} belongs to uid {owner}, not to this user ({me}) or root", path.display());
    }
    let text = grantline_proto::files::read_secret(path).with_context(what)?;
    parse_options(&text, path)
}

/// Parses `KEY=VALUE` lines (blank lines and `#` comments skipped); errors
/// name the line of `path`, never a value (values may be secret).
pub fn parse_options(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut options = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("{} line {}: not KEY=VALUE (values are not shown: they may be secret)", path.display(), n + 1);
        };
        let key = key.trim().to_ascii_lowercase();
        if !PREFIXES.iter().any(|p| key.starts_with(p)) {
            // A name is shown only if it looks like one: a value wrapped onto
            // a line of its own (a key's base64) must not reach the log.
            let name = Some(&key)
                .filter(|k| k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                .map_or_else(String::new, |k| format!("{k:?} "));
            bail!(
                "{} line {}: {name}is not an object store option; the names start with AWS_, GOOGLE_, AZURE_ \
                 or OBJECT_STORE_",
                path.display(),
                n + 1
            );
        }
        if options.len() == MAX_OPTIONS {
            bail!("{} holds more than {MAX_OPTIONS} options", path.display());
        }
        options.push((key, value.trim().to_owned()));
    }
    Ok(options)
}

/// Options that send a credential provider the checks above missed to a
/// closed loopback port instead of a metadata address (AWS and Azure take
/// the address as an option; GCS only from its environment).
pub(crate) const NO_METADATA: [(&str, &str); 2] = [
    ("aws_metadata_endpoint", "http://127.0.0.1:1"),
    ("azure_msi_endpoint", "http://127.0.0.1:1/metadata/identity/oauth2/token"),
];

/// Refuses a cloud anchor that would take its credentials from a metadata
/// address without being asked to, and any scheme but file, s3, gs and az.
pub(crate) fn check(
    scheme: ObjectStoreScheme,
    url: &url::Url,
    options: &[(String, String)],
    instance_credentials: bool,
) -> Result<()> {
    // What the store's builder will hold for a key: the last value given
    // under any of its names, as the builder applies them in order.
    fn last<'o, K: FromStr + PartialEq>(options: &'o [(String, String)], wanted: &K) -> Option<&'o str> {
        options.iter().rev().find(|(k, _)| k.parse::<K>().is_ok_and(|k| k == *wanted)).map(|(_, v)| v.as_str())
    }
    fn has<K: FromStr + PartialEq>(options: &[(String, String)], wanted: &[K]) -> bool {
        wanted.iter().all(|k| last(options, k).is_some_and(|v| !v.is_empty()))
    }
    fn is_true<K: FromStr + PartialEq>(options: &[(String, String)], wanted: K) -> bool {
        last(options, &wanted)
            .is_some_and(|v| ["1", "true", "on", "yes", "y"].contains(&v.to_ascii_lowercase().as_str()))
    }
    let (explicit, what) = match scheme {
        ObjectStoreScheme::Local => return Ok(()),
        ObjectStoreScheme::AmazonS3 => (
            has(options, &[S3::AccessKeyId, S3::SecretAccessKey])
                || is_true(options, S3::SkipSignature)
                || has(options, &[S3::WebIdentityTokenFile, S3::RoleArn]),
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT, with AWS_ALLOW_HTTP=true for \
             plain HTTP, for a server other than AWS)",
        ),
        // Not `skip_signature`: object_store's GCS client still asks its
        // credential provider (the metadata service) for every write.
        ObjectStoreScheme::GoogleCloudStorage => (
            [Gcs::ServiceAccount, Gcs::ServiceAccountKey, Gcs::ApplicationCredentials, Gcs::BearerToken]
                .into_iter()
                .any(|k| has(options, &[k])),
            "GOOGLE_SERVICE_ACCOUNT (a key file) or GOOGLE_SERVICE_ACCOUNT_KEY (its JSON; for an emulator, \
             one with \"gcs_base_url\" and \"disable_oauth\": true)",
        ),
        ObjectStoreScheme::MicrosoftAzure => {
            // The builder's own order (`resolve_credential_auto`): only the
            // static and token-exchange credentials; the Azure CLI and the
            // managed identity (IMDS) are the machine's.
            let auto = has(options, &[Az::Token])
                || has(options, &[Az::AccessKey])
                || has(options, &[Az::ClientId, Az::AuthorityId, Az::FederatedTokenFile])
                || has(options, &[Az::ClientId, Az::ClientSecret, Az::AuthorityId])
                || has(options, &[Az::SasKey]);
            let explicit = match last(options, &Az::CredentialType).map(str::to_ascii_lowercase).as_deref() {
                None | Some("auto") => auto,
                Some("access_key") => has(options, &[Az::AccessKey]),
                Some("bearer_token") => has(options, &[Az::Token]),
                Some("sas_token") => has(options, &[Az::SasKey]),
                Some("client_secret") => has(options, &[Az::ClientId, Az::ClientSecret, Az::AuthorityId]),
                Some("workload_identity") => has(options, &[Az::ClientId, Az::AuthorityId, Az::FederatedTokenFile]),
                Some(_) => false,
            };
            (
                explicit || is_true(options, Az::UseEmulator) || is_true(options, Az::SkipSignature),
                "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_KEY (or \
                 AZURE_STORAGE_USE_EMULATOR=true for Azurite)",
            )
        }
        _ => bail!("anchor {url} has an unsupported scheme; the schemes are file, s3, gs and az"),
    };
    if !explicit && !instance_credentials {
        bail!(
            "anchor {url} has no credentials, and would ask this machine's cloud metadata service for them: \
             set {what} in the environment or the anchor's options file, or allow instance credentials \
             (anchor_instance_credentials = true in grantlined.toml, --instance-credentials for grantline)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(url: &str, options: &[(&str, &str)], instance: bool) -> Result<()> {
        let url = url::Url::parse(url).unwrap();
        let (scheme, _) = ObjectStoreScheme::parse(&url).unwrap();
        let options: Vec<_> = options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        check(scheme, &url, &options, instance)
    }

    #[test]
    fn a_cloud_url_without_credentials_is_refused_naming_what_to_set() {
        for (url, name) in
            [("s3://b/p", "AWS_ACCESS_KEY_ID"), ("gs://b/p", "GOOGLE_SERVICE_ACCOUNT"), ("az://c/p", "AZURE_STORAGE")]
        {
            let e = checked(url, &[("aws_endpoint", "http://127.0.0.1:9")], false).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("metadata") && e.contains("instance"), "{e}");
            checked(url, &[], true).unwrap();
        }
        // Half a key pair is no credential.
        assert!(checked("s3://b", &[("aws_access_key_id", "k")], false).is_err());
        assert!(checked("s3://b", &[("aws_access_key_id", "k"), ("aws_secret_access_key", "")], false).is_err());
        assert!(checked("az://c", &[("azure_storage_use_emulator", "false")], false).is_err());
        // The builder keeps the last value of a key: so does the check.
        assert!(checked("s3://b", &[("aws_skip_signature", "true"), ("skip_signature", "false")], false).is_err());
        assert!(checked("az://c", &[("use_emulator", "yes"), ("azure_storage_use_emulator", "0")], false).is_err());
        // A client secret without its tenant, and credential types of the
        // machine, reach Azure's managed identity.
        assert!(checked("az://c", &[("azure_client_id", "i"), ("azure_client_secret", "s")], false).is_err());
        assert!(checked("gs://b", &[("google_skip_signature", "true")], false).is_err());
        for kind in ["managed_identity", "azure_cli", "something"] {
            let opts = [("azure_storage_account_key", "k"), ("azure_credential_type", kind)];
            assert!(checked("az://c", &opts, false).is_err(), "{kind}");
        }
        assert!(checked("memory:///", &[], true).unwrap_err().to_string().contains("unsupported scheme"));
    }

    #[test]
    fn explicit_credentials_under_any_alias_are_accepted() {
        checked("s3://b", &[("aws_access_key_id", "k"), ("secret_access_key", "s")], false).unwrap();
        checked("s3://b", &[("aws_skip_signature", "TRUE")], false).unwrap();
        checked("gs://b", &[("google_service_account_key", "{}")], false).unwrap();
        checked("az://c", &[("azure_storage_use_emulator", "true")], false).unwrap();
        checked("az://c", &[("azure_storage_account_key", "k")], false).unwrap();
        checked("az://c", &[("azure_client_id", "i"), ("azure_client_secret", "s"), ("azure_tenant_id", "t")], false)
            .unwrap();
        checked("az://c", &[("azure_storage_sas_key", "sv=x"), ("azure_credential_type", "sas_token")], false).unwrap();
        checked("s3://b", &[("aws_skip_signature", "false"), ("aws_skip_signature", "on")], false).unwrap();
        checked("file:///tmp/x", &[], false).unwrap();
    }

    #[test]
    fn an_options_file_must_be_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchor.env");
        grantline_proto::files::write_secret(&path, b"# moto\nAWS_ACCESS_KEY_ID = k\n\naws_secret_access_key=s=x\n")
            .unwrap();
        let access = Access { options_file: Some(path.clone()), ..Access::default() };
        let options = access.options().unwrap();
        assert!(options.contains(&("aws_access_key_id".into(), "k".into())), "{options:?}");
        assert!(options.contains(&("aws_secret_access_key".into(), "s=x".into())), "{options:?}");
        for (text, want) in
            [("HOME=/root\n", "\"home\" is not an object store option"), ("AWS_SECRET\n", "not KEY=VALUE")]
        {
            grantline_proto::files::write_secret(&path, text.as_bytes()).unwrap();
            let e = format!("{:#}", access.options().unwrap_err());
            assert!(e.contains(want), "{e}");
        }
        // A wrapped key's line is not echoed.
        grantline_proto::files::write_secret(&path, b"MIIEvQIBADANBgkqhkiG9w0B+/x==\n").unwrap();
        let e = format!("{:#}", access.options().unwrap_err());
        assert!(e.contains("line 1: is not an object store option") && !e.contains("miie"), "{e}");
        std::fs::write(&path, "AWS_ACCESS_KEY_ID=k\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let e = format!("{:#}", access.options().unwrap_err());
        assert!(e.contains("chmod 600"), "{e}");
    }
}
