//! Unit tests of `process`.

use super::*;

#[test]
fn config_deserialises_with_defaults_and_rejects_typos() {
    let config: ProcessConfig = serde_json::from_str(r#"{"root": "/srv/hearth"}"#).unwrap();
    assert_eq!(config.root, PathBuf::from("/srv/hearth"));
    assert_eq!(config.shell, PathBuf::from("/bin/sh"));
    assert_eq!(
        config.isolation,
        Isolation::Sandbox,
        "isolation is the default"
    );
    assert_eq!(config.snapshot_compression_level, 3);

    let config: ProcessConfig = serde_json::from_str(
        r#"{"isolation": "none", "sandbox": {"bwrap": "/opt/bwrap", "uid": 7}}"#,
    )
    .unwrap();
    assert_eq!(config.isolation, Isolation::None);
    assert_eq!(config.sandbox.bwrap, PathBuf::from("/opt/bwrap"));
    assert_eq!(config.sandbox.uid, 7);
    assert!(serde_json::from_str::<ProcessConfig>(r#"{"rooot": "/x"}"#).is_err());
    assert!(serde_json::from_str::<ProcessConfig>(r#"{"isolation": "bwrap"}"#).is_err());
}

#[test]
fn a_root_is_opened_by_one_provider_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let first = ProcessProvider::open(ProcessConfig::new(tmp.path())).unwrap();
    let err = ProcessProvider::open(ProcessConfig::new(tmp.path())).unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
    drop(first);
    ProcessProvider::open(ProcessConfig::new(tmp.path())).unwrap();
}

#[test]
fn a_missing_sandbox_tool_is_unavailable_and_says_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = ProcessConfig::new(tmp.path());
    config.sandbox.bwrap = tmp.path().join("no-bwrap");
    let err = ProcessProvider::open(config).unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
    assert!(
        err.to_string().contains("apt-get install bubblewrap"),
        "{err}"
    );
    assert!(err.to_string().contains("--isolation none"), "{err}");

    let mut config = ProcessConfig::new(tmp.path());
    config.agent = Some(tmp.path().join("no-agent"));
    let err = ProcessProvider::open(config).unwrap_err();
    assert!(err.to_string().contains("hearth-guest-agent"), "{err}");
}
