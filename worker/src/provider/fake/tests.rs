//! Unit tests of `fake`.

use super::*;

#[test]
fn interpreter_covers_its_documented_commands() {
    let files = FileMap::from([(
        "d/f".to_owned(),
        FakeFile {
            data: b"content".to_vec(),
            mode: 0o644,
        },
    )]);
    let run = |p: Program, stdin: Option<&[u8]>| interpret(&p, stdin, &files);
    assert_eq!(run(Program::Argv(vec!["false".into()]), None).exit_code, 1);
    assert_eq!(run(Program::Shell("exit 7".into()), None).exit_code, 7);
    assert_eq!(
        run(Program::Shell("echo a  b".into()), None).stdout,
        b"a b\n"
    );
    assert_eq!(
        run(Program::Argv(vec!["cat".into()]), Some(b"in")).stdout,
        b"in"
    );
    assert_eq!(
        run(Program::Argv(vec!["cat".into(), "d/f".into()]), None).stdout,
        b"content"
    );
    assert_eq!(
        run(Program::Argv(vec!["cat".into(), "nope".into()]), None).exit_code,
        1
    );
    assert_eq!(
        run(Program::Shell("sleep 0.5".into()), None).sleep,
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        run(Program::Shell("anything else".into()), None).exit_code,
        0
    );
}

#[test]
fn directories_are_implicit_in_the_file_map() {
    let files = FileMap::from([(
        "a/b/c".to_owned(),
        FakeFile {
            data: vec![],
            mode: 0o644,
        },
    )]);
    assert!(is_dir(&files, ""));
    assert!(is_dir(&files, "a"));
    assert!(is_dir(&files, "a/b"));
    assert!(!is_dir(&files, "a/b/c"));
    assert!(!is_dir(&files, "a/bb"));
}

#[tokio::test]
async fn injected_failures_fire_once() {
    let fake = FakeProvider::new();
    let id = VmId::new("vm").unwrap();
    fake.fail_next(FakeOp::Create, ProviderError::Unavailable("boom".into()));
    assert!(matches!(
        fake.create_vm(&id).await,
        Err(ProviderError::Unavailable(_))
    ));
    assert!(fake.create_vm(&id).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn latency_is_applied_per_operation() {
    let fake = FakeProvider::with_config(
        FakeConfig::default().with_latency(FakeOp::Create, Duration::from_secs(3)),
    );
    let started = tokio::time::Instant::now();
    fake.create_vm(&VmId::new("vm").unwrap()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(3));
}
