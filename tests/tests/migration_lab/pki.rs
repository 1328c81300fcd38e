//! Certificates for the TLS tests, made in the test (rcgen): a CA and the host
//! certificates it signs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// One host's files, as `serve --tls-cert/--tls-key/--tls-ca` takes them.
pub struct HostFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl HostFiles {
    /// The `serve` arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Self {
            ca: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A certificate naming `names` (IP addresses or DNS names), for both TLS roles, its key
    /// and this CA, as `dir/TAG.crt`, `dir/TAG.key`, `dir/TAG-ca.crt`.
    pub fn host(&self, dir: &Path, tag: &str, names: &[&str]) -> HostFiles {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, tag);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.ca).unwrap();
        let files = HostFiles {
            cert: dir.join(format!("{tag}.crt")),
            key: dir.join(format!("{tag}.key")),
            ca: dir.join(format!("{tag}-ca.crt")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, self.ca.pem()).unwrap();
        files
    }
}
