//! Remote stores on a directory (`file://`): push, pull, verification, interrupted transfers,
//! concurrent pushes and gc, through the engine's API. The same against a real S3-compatible
//! server is in the top-level `tests/remote.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rudder_engine::key::KeyBuilder;
use rudder_engine::remote::{Remote, RemoteError, RemoteTarget, Settings, Wanted};
use rudder_engine::runner::NoProgress;
use rudder_engine::store::{Health, LAYOUT_VERSION, Manifest};
use rudder_engine::{Key, Store, VerifyMode};

fn store_in(dir: &Path) -> Store {
    let store = Store::new(dir.join(".rudder"));
    store.init().unwrap();
    store
}

/// Commits an artifact with these files to the store.
fn artifact(store: &Store, name: &str, files: &[(&str, &[u8])]) -> Wanted {
    let key = KeyBuilder::new("test").str(name).finish();
    let _lock = store.lock(|_| {}).unwrap();
    let _key_lock = store.lock_key(&key, |_| {}).unwrap();
    let pending = store.begin(&key).unwrap();
    for (file, bytes) in files {
        let path = pending.dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let described = store.describe_files(&pending).unwrap();
    let outputs = described
        .iter()
        .map(|f| (f.name.clone(), f.blake3.clone()))
        .collect();
    let manifest = Manifest {
        layout: LAYOUT_VERSION,
        key: key.to_hex(),
        kind: "command".into(),
        name: name.into(),
        implementation_version: 1,
        params: serde_json::Value::Null,
        inputs: BTreeMap::new(),
        seed: 0,
        backend: "cpu".into(),
        precision: "fp32".into(),
        files: described,
        summary: BTreeMap::new(),
        sandbox: None,
        rudder_version: "test".into(),
        started: String::new(),
        seconds: 0.0,
        peak_memory: None,
    };
    store.commit(pending, &manifest).unwrap();
    Wanted {
        name: name.into(),
        key,
        outputs,
    }
}

fn remote_at(dir: &Path) -> Remote {
    let target = RemoteTarget::new(
        Some("shared".into()),
        &dir.display().to_string(),
        Path::new("/"),
        "test".into(),
    );
    Remote::open(&target, true).unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn blobs(remote_dir: &Path) -> Vec<PathBuf> {
    files_under(&remote_dir.join("blobs"))
}

fn manifests(remote_dir: &Path) -> Vec<PathBuf> {
    files_under(&remote_dir.join("artifacts"))
}

/// The files a manifest lists, without their stats (which are each store's own).
fn contents(store: &Store, key: &Key) -> Vec<(String, u64, String)> {
    store
        .manifest(key)
        .unwrap()
        .unwrap()
        .files
        .into_iter()
        .map(|f| (f.name, f.size, f.blake3))
        .collect()
}

fn read(store: &Store, key: &Key, file: &str) -> Vec<u8> {
    std::fs::read(store.object_dir(key).join(file)).unwrap()
}

#[test]
fn pushed_artifacts_pull_into_an_empty_store_and_shared_files_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let shared = b"the same tokenizer".as_slice();
    let one = artifact(&here, "one", &[("tok.json", shared), ("sub/x.txt", b"one")]);
    let two = artifact(&here, "two", &[("tok.json", shared), ("y.txt", b"two")]);
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    let report = remote
        .push(&here, &[one.clone(), two.clone()], &NoProgress)
        .unwrap();
    assert_eq!(report.pushed, ["one", "two"]);
    assert_eq!(report.files, 3, "tok.json is uploaded once");
    assert_eq!(blobs(&remote_dir).len(), 3);
    assert_eq!(manifests(&remote_dir).len(), 2);

    let again = remote
        .push(&here, &[one.clone(), two.clone()], &NoProgress)
        .unwrap();
    assert!(again.pushed.is_empty());
    assert_eq!(again.present, ["one", "two"]);

    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let pulled = remote
        .pull(
            &there,
            &[one.clone(), two.clone()],
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert!(pulled.errors.is_empty(), "{:?}", pulled.errors);
    assert_eq!(pulled.pulled, ["one", "two"]);
    assert_eq!(pulled.files, 3);
    assert!(pulled.differ_from_lockfile.is_empty());
    for (wanted, file) in [(&one, "tok.json"), (&one, "sub/x.txt"), (&two, "y.txt")] {
        assert_eq!(
            read(&there, &wanted.key, file),
            read(&here, &wanted.key, file)
        );
    }
    assert_eq!(contents(&there, &two.key), contents(&here, &two.key));
    // Committed as a local build is: read-only, with this store's stats, and intact when every
    // file is hashed.
    for wanted in [&one, &two] {
        let dir = there.object_dir(&wanted.key);
        for path in [dir.clone(), dir.join("tok.json"), dir.join("manifest.json")] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o222, 0, "{} is writable", path.display());
        }
        let manifest = there.manifest(&wanted.key).unwrap().unwrap();
        assert!(manifest.files.iter().all(|f| f.stat.is_some()));
        assert_eq!(there.check(&wanted.key, VerifyMode::Full), Health::Intact);
    }
    // The remote's manifests carry no stats: they describe the pushing machine's disk.
    for path in manifests(&remote_dir) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.contains("inode"), "{text}");
    }
    // Nothing waits in the pull cache once the artifacts are in.
    assert!(files_under(&there.root().join("cache/pull")).is_empty());
    let once_more = remote
        .pull(&there, &[one, two], VerifyMode::Cheap, &NoProgress)
        .unwrap();
    assert_eq!(once_more.present.len(), 2);
    assert_eq!(once_more.files, 0);
}

#[test]
fn a_flipped_byte_on_the_remote_is_detected_and_never_enters_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let good = artifact(&here, "good", &[("a.txt", b"fine")]);
    let bad = artifact(
        &here,
        "bad",
        &[("weights.bin", &[7u8; 4096]), ("b.txt", b"ok")],
    );
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    remote
        .push(&here, &[good.clone(), bad.clone()], &NoProgress)
        .unwrap();
    let digest = blake3::hash(&[7u8; 4096]).to_hex().to_string();
    let blob = remote_dir.join("blobs").join(&digest[..2]).join(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();

    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let report = remote
        .pull(
            &there,
            &[good.clone(), bad.clone()],
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(report.pulled, ["good"], "the intact artifact is pulled");
    assert_eq!(report.errors.len(), 1);
    let message = report.errors[0].to_string();
    assert!(
        matches!(report.errors[0], RemoteError::Corrupt(_)),
        "{message}"
    );
    assert!(message.contains("`weights.bin` of bad"), "{message}");
    assert!(message.contains(&digest), "{message}");
    assert!(!there.contains(&bad.key));
    assert!(there.objects().unwrap().len() == 1);
    // Neither the store nor the pull cache holds the corrupt bytes.
    assert!(!there.root().join("cache/pull").join(&digest).exists());
    assert!(
        files_under(&there.root().join("tmp")).is_empty(),
        "nothing half-written"
    );
}

#[test]
fn an_interrupted_push_leaves_no_artifact_and_the_next_push_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let item = artifact(&here, "x", &[("a.txt", b"a"), ("b.txt", b"b")]);
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    remote
        .push(&here, std::slice::from_ref(&item), &NoProgress)
        .unwrap();
    // What a push killed after its blobs and before its manifest leaves.
    for manifest in manifests(&remote_dir) {
        std::fs::remove_file(manifest).unwrap();
    }
    std::fs::remove_file(blobs(&remote_dir)[0].clone()).unwrap();
    assert!(remote.has(&[item.key]).unwrap().is_empty());
    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(report.missing, ["x"]);
    assert!(!there.contains(&item.key));

    let report = remote
        .push(&here, std::slice::from_ref(&item), &NoProgress)
        .unwrap();
    assert_eq!(report.pushed, ["x"]);
    assert_eq!((report.files, report.reused), (1, 1));
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(report.pulled, ["x"]);
}

#[test]
fn an_interrupted_pull_resumes_without_fetching_verified_files_again() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let item = artifact(
        &here,
        "x",
        &[("a.txt", b"aaaa"), ("b.txt", b"bbbb"), ("c.txt", b"cccc")],
    );
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    remote
        .push(&here, std::slice::from_ref(&item), &NoProgress)
        .unwrap();
    // One blob goes missing from the remote: the pull stops short of committing.
    let digest = blake3::hash(b"cccc").to_hex().to_string();
    let blob = remote_dir.join("blobs").join(&digest[..2]).join(&digest);
    let saved = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert!(report.pulled.is_empty());
    assert_eq!(report.files, 2);
    let message = report.errors[0].to_string();
    assert!(
        message.contains("`c.txt` of x") && message.contains("missing"),
        "{message}"
    );
    assert!(!there.contains(&item.key));
    // The blob is back: only it is fetched, and what waited in the pull cache is hashed again
    // (a.txt's copy there was damaged meanwhile, so it is fetched again too).
    std::fs::write(&blob, saved).unwrap();
    let kept = there
        .root()
        .join("cache/pull")
        .join(blake3::hash(b"aaaa").to_hex().as_str());
    std::fs::write(&kept, b"aaab").unwrap();
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.pulled, ["x"]);
    assert_eq!((report.files, report.resumed), (2, 1));
    assert_eq!(read(&there, &item.key, "c.txt"), b"cccc");
    assert_eq!(read(&there, &item.key, "a.txt"), b"aaaa");
    assert_eq!(there.check(&item.key, VerifyMode::Full), Health::Intact);
}

#[test]
fn large_files_go_in_parts_and_come_back_in_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let big: Vec<u8> = (0..(5u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let item = artifact(&here, "big", &[("model.safetensors", &big)]);
    let remote_dir = dir.path().join("remote");
    let settings = Settings {
        part_size: 1 << 20,
        ..Settings::default()
    };
    let remote = remote_at(&remote_dir).with_settings(settings);
    let report = remote
        .push(&here, std::slice::from_ref(&item), &NoProgress)
        .unwrap();
    assert_eq!(report.bytes, big.len() as u64);
    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(read(&there, &item.key, "model.safetensors") == big);
}

/// Opens an artifact's file for writing, as a user with a text editor would (root ignores the
/// read-only bit anyway).
fn writable(store: &Store, key: &Key, file: &str) -> PathBuf {
    let path = store.object_dir(key).join(file);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

#[test]
fn a_file_changed_in_the_store_is_never_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let good = artifact(&here, "good", &[("g.txt", b"good")]);
    let item = artifact(&here, "x", &[("a.txt", b"original")]);
    std::fs::write(writable(&here, &item.key, "a.txt"), b"tampered").unwrap();
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    let err = remote
        .push(&here, &[good.clone(), item.clone()], &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupted in the local store, so not pushed: x (")
            && err.contains("file a.txt: digest mismatch"),
        "{err}"
    );
    assert!(manifests(&remote_dir).is_empty());
    assert!(blobs(&remote_dir).is_empty(), "nothing was uploaded");
}

/// Bytes that differ from the manifest while every stat matches (a disk that rots, a digest
/// recorded wrong) pass the cheap check; the hash taken as the file is uploaded finds them.
#[test]
fn a_mismatch_the_stats_do_not_show_is_found_as_the_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let item = artifact(&here, "x", &[("a.txt", b"original")]);
    let manifest_path = writable(&here, &item.key, "manifest.json");
    let mut manifest = here.manifest(&item.key).unwrap().unwrap();
    let recorded = blake3::hash(b"what the file once held")
        .to_hex()
        .to_string();
    manifest.files[0].blake3 = recorded.clone();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    assert_eq!(here.check(&item.key, VerifyMode::Cheap), Health::Intact);
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    let err = remote
        .push(&here, std::slice::from_ref(&item), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x: a.txt in the local store")
            && err.contains("no longer matches its manifest")
            && err.contains(&recorded),
        "{err}"
    );
    assert!(manifests(&remote_dir).is_empty());
    assert!(blobs(&remote_dir).is_empty());
}

#[test]
fn a_corrupted_artifact_in_the_store_is_quarantined_and_pulled_again() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let item = artifact(&here, "x", &[("a.txt", b"original"), ("b.txt", b"b")]);
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    remote
        .push(&here, std::slice::from_ref(&item), &NoProgress)
        .unwrap();
    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    std::fs::write(writable(&there, &item.key, "a.txt"), b"edited").unwrap();
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.pulled, ["x"]);
    assert_eq!(report.quarantined.len(), 1);
    let moved = &report.quarantined[0];
    assert_eq!(moved.name, "x");
    assert_eq!(
        moved
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["file a.txt: digest mismatch"]
    );
    assert!(moved.place.starts_with(there.quarantine_dir()));
    assert_eq!(
        std::fs::read(moved.place.join("artifact/a.txt")).unwrap(),
        b"edited"
    );
    assert_eq!(read(&there, &item.key, "a.txt"), b"original");
    assert_eq!(there.check(&item.key, VerifyMode::Full), Health::Intact);
    // An intact artifact is left alone.
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&item),
            VerifyMode::Full,
            &NoProgress,
        )
        .unwrap();
    assert_eq!((report.present.len(), report.files), (1, 0));
    assert!(report.quarantined.is_empty());
}

#[test]
fn racing_pushes_of_one_key_keep_the_first_artifact_whole() {
    let dir = tempfile::tempdir().unwrap();
    let remote_dir = dir.path().join("remote");
    // Two machines built the same key with different bytes (a stage that records a time).
    let stores: Vec<Store> = (0..2)
        .map(|i| store_in(&dir.path().join(format!("m{i}"))))
        .collect();
    let items: Vec<Wanted> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let stamp = format!("built on machine {i}");
            artifact(
                store,
                "x",
                &[("stamp.txt", stamp.as_bytes()), ("same.txt", b"s")],
            )
        })
        .collect();
    assert_eq!(items[0].key, items[1].key);
    std::thread::scope(|scope| {
        for (store, item) in stores.iter().zip(&items) {
            let remote_dir = &remote_dir;
            scope.spawn(move || {
                let remote = remote_at(remote_dir);
                let report = remote
                    .push(store, std::slice::from_ref(item), &NoProgress)
                    .unwrap();
                assert_eq!(
                    report.pushed.len() + report.raced.len() + report.present.len(),
                    1
                );
            });
        }
    });
    assert_eq!(manifests(&remote_dir).len(), 1);
    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let remote = remote_at(&remote_dir);
    let report = remote
        .pull(
            &there,
            std::slice::from_ref(&items[0]),
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let stamp = String::from_utf8(read(&there, &items[0].key, "stamp.txt")).unwrap();
    let winner = stores
        .iter()
        .position(|s| read(s, &items[0].key, "stamp.txt") == stamp.as_bytes())
        .expect("the pulled artifact is one machine's, whole");
    assert_eq!(
        contents(&there, &items[0].key),
        contents(&stores[winner], &items[0].key)
    );
}

#[test]
fn gc_keeps_what_a_lockfile_references_and_everything_young() {
    let dir = tempfile::tempdir().unwrap();
    let here = store_in(&dir.path().join("a"));
    let kept = artifact(&here, "kept", &[("shared.txt", b"shared"), ("k.txt", b"k")]);
    let gone = artifact(&here, "gone", &[("shared.txt", b"shared"), ("g.txt", b"g")]);
    let remote_dir = dir.path().join("remote");
    let remote = remote_at(&remote_dir);
    remote
        .push(&here, &[kept.clone(), gone.clone()], &NoProgress)
        .unwrap();
    let keep = BTreeSet::from([kept.key]);
    // Everything is younger than a day: nothing goes.
    let report = remote
        .gc(&keep, Duration::from_secs(24 * 3600), true)
        .unwrap();
    assert!(report.artifacts.is_empty());
    assert_eq!((report.young_artifacts, report.referenced), (1, 1));
    assert_eq!(manifests(&remote_dir).len(), 2);
    // Without `apply`, only a report.
    let dry = remote.gc(&keep, Duration::ZERO, false).unwrap();
    assert_eq!(dry.artifacts.len(), 1);
    assert_eq!(dry.blobs, 1, "g.txt; shared.txt is still named by `kept`");
    assert_eq!(manifests(&remote_dir).len(), 2);
    let report = remote.gc(&keep, Duration::ZERO, true).unwrap();
    assert_eq!(report.artifacts[0].0, gone.key);
    assert_eq!(report.blobs, 1);
    assert_eq!(manifests(&remote_dir).len(), 1);
    assert_eq!(blobs(&remote_dir).len(), 2);
    let there = store_in(&dir.path().join("b"));
    let _lock = there.lock(|_| {}).unwrap();
    let report = remote
        .pull(
            &there,
            &[kept.clone(), gone.clone()],
            VerifyMode::Cheap,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(report.pulled, ["kept"]);
    assert_eq!(report.missing, ["gone"]);
    // Blobs no manifest names (an interrupted push) go too, once old enough.
    std::fs::create_dir_all(remote_dir.join("blobs/ab")).unwrap();
    std::fs::write(remote_dir.join("blobs/ab").join("ab".repeat(32)), b"orphan").unwrap();
    let report = remote.gc(&keep, Duration::from_secs(3600), true).unwrap();
    assert_eq!((report.blobs, report.young_blobs), (0, 1));
    let report = remote.gc(&keep, Duration::ZERO, true).unwrap();
    assert_eq!(report.blobs, 1);
    assert_eq!(blobs(&remote_dir).len(), 2);
}

#[test]
fn a_newer_remote_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let remote_dir = dir.path().join("remote");
    std::fs::create_dir_all(&remote_dir).unwrap();
    std::fs::write(remote_dir.join("rudder-remote.json"), r#"{"layout": 9}"#).unwrap();
    let remote = remote_at(&remote_dir);
    let key = KeyBuilder::new("test").str("k").finish();
    let err = remote.has(&[key]).unwrap_err().to_string();
    assert!(err.contains("layout version 9"), "{err}");
}

#[test]
fn a_missing_directory_is_an_error_unless_pushing() {
    let dir = tempfile::tempdir().unwrap();
    let target = RemoteTarget::new(None, "nowhere", dir.path(), "test".into());
    let err = Remote::open(&target, false).unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
    Remote::open(&target, true).unwrap();
    assert!(dir.path().join("nowhere").is_dir());
}
