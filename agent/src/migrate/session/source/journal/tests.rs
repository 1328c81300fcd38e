use super::*;

fn tiny() -> Journal {
    Journal {
        header: Header {
            vm: "vm1".into(),
            session: "000102030405060708090a0b0c0d0e0f".into(),
            to: "10.0.0.2:7000".into(),
            addr: "10.0.0.2:7000".parse().unwrap(),
            wire_version: 1,
            mode: "postcopy".into(),
            page_size: 4096,
            pages: 6,
            memory_file: "/dev/shm/vm1.ram".into(),
            own_device: Some("/var/lib/pagewise/vm1.swap".into()),
            handed_over_device: None,
            max_bandwidth: 0,
            qmp: Some("/run/vm1.qmp".into()),
            qemu_pid: Some(4242),
            qemu_start: Some(987654),
        },
        map: vec![0, 1, 2, 3, 4, 5],
    }
}

#[test]
fn a_journal_round_trips() {
    let j = tiny();
    let back = Journal::decode(&j.encode()).unwrap();
    assert_eq!(back, j);
    assert_eq!(back.session(), std::array::from_fn(|i| i as u8));
    assert_eq!(
        back.mode().unwrap(),
        crate::migrate::message::Mode::Postcopy
    );
    let places: Vec<Where> = (0..7).map(|p| back.place(p)).collect();
    assert_eq!(
        places,
        [
            Where::Memory,
            Where::OwnDevice,
            Where::HandedOver,
            Where::Freed,
            Where::Zero,
            Where::Shared,
            Where::Zero,
        ]
    );
}

#[test]
fn the_layout_is_pinned() {
    let j = Journal {
        header: Header {
            own_device: None,
            qmp: None,
            qemu_pid: None,
            qemu_start: None,
            pages: 3,
            ..tiny().header
        },
        map: vec![0, 4, 3],
    };
    let bytes = j.encode();
    let header = br#"{"vm":"vm1","session":"000102030405060708090a0b0c0d0e0f","to":"10.0.0.2:7000","addr":"10.0.0.2:7000","wire_version":1,"mode":"postcopy","page_size":4096,"pages":3,"memory_file":"/dev/shm/vm1.ram","own_device":null,"handed_over_device":null,"max_bandwidth":0,"qmp":null,"qemu_pid":null,"qemu_start":null}"#;
    let mut want = b"PWMJRNL1".to_vec();
    want.extend_from_slice(&(header.len() as u32).to_le_bytes());
    want.extend_from_slice(header);
    // lz4 block, size prepended: 3 literals (token 0x30) and no match.
    want.extend_from_slice(&[8, 0, 0, 0, 3, 0, 0, 0, 0x30, 0, 4, 3]);
    let crc = crc32c::crc32c(&want);
    want.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(bytes, want);
    assert_eq!(&bytes[..12], b"PWMJRNL1\x2f\x01\x00\x00");
}

#[test]
fn every_truncation_is_refused() {
    let bytes = tiny().encode();
    for n in 0..bytes.len() {
        assert!(Journal::decode(&bytes[..n]).is_err(), "{n} bytes decoded");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(Journal::decode(&long).is_err());
}

#[test]
fn every_flipped_byte_is_caught() {
    let bytes = tiny().encode();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        assert!(Journal::decode(&bad).is_err(), "byte {i} flipped decoded");
    }
}

/// Re-seal a body with a correct checksum (what a bug, not a torn write, would produce).
fn sealed(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

fn with_header(header: &[u8], map: &[u8]) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&(header.len() as u32).to_le_bytes());
    b.extend_from_slice(header);
    let map = lz4_flex::block::compress_prepend_size(map);
    b.extend_from_slice(&(map.len() as u32).to_le_bytes());
    b.extend_from_slice(&map);
    sealed(b)
}

#[test]
fn checked_contents_are_refused_by_name() {
    let good = tiny();
    let header = |h: &Header| serde_json::to_vec(h).unwrap();
    let e = Journal::decode(&with_header(&header(&good.header), &[0, 1, 2, 3, 4, 9]));
    assert!(
        matches!(e, Err(JournalError::BadEntry { page: 5, value: 9 })),
        "{e:?}"
    );
    let e = Journal::decode(&with_header(&header(&good.header), &[0, 1]));
    assert!(
        matches!(e, Err(JournalError::MapSize { got: 2, pages: 6 })),
        "{e:?}"
    );
    let odd = Header {
        page_size: 8192,
        ..good.header.clone()
    };
    let e = Journal::decode(&with_header(&header(&odd), &good.map));
    assert!(matches!(e, Err(JournalError::PageSize(8192))), "{e:?}");
    let odd = Header {
        session: "xyz".into(),
        ..good.header.clone()
    };
    let e = Journal::decode(&with_header(&header(&odd), &good.map));
    assert!(matches!(e, Err(JournalError::Session(_))), "{e:?}");
    let odd = Header {
        mode: "warp".into(),
        ..good.header.clone()
    };
    let e = Journal::decode(&with_header(&header(&odd), &good.map));
    assert!(matches!(e, Err(JournalError::Mode(_))), "{e:?}");
    let odd = Header {
        pages: MAX_PAGES + 1,
        ..good.header.clone()
    };
    let e = Journal::decode(&with_header(&header(&odd), &good.map));
    assert!(matches!(e, Err(JournalError::TooManyPages(_))), "{e:?}");
    let e = Journal::decode(&with_header(br#"{"vm":1}"#, &good.map));
    assert!(matches!(e, Err(JournalError::Header(_))), "{e:?}");
    // A header length beyond the bound is refused before anything is read.
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&(MAX_HEADER + 1).to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    let e = Journal::decode(&sealed(b));
    assert!(
        matches!(e, Err(JournalError::TooLong { what: "header", .. })),
        "{e:?}"
    );
    let e = Journal::decode(b"NOTAJRNL\0\0\0\0\0\0\0\0\0\0\0\0");
    assert!(matches!(e, Err(JournalError::BadMagic(_))), "{e:?}");
}

#[test]
fn a_lying_map_size_does_not_allocate() {
    // The lz4 size prefix says the header's page count, the block is a few bytes.
    let good = tiny();
    let mut b = MAGIC.to_vec();
    let header = serde_json::to_vec(&Header {
        pages: MAX_PAGES,
        ..good.header
    })
    .unwrap();
    b.extend_from_slice(&(header.len() as u32).to_le_bytes());
    b.extend_from_slice(&header);
    let mut map = (MAX_PAGES as u32).to_le_bytes().to_vec();
    map.extend_from_slice(&[0x10, 0]);
    b.extend_from_slice(&(map.len() as u32).to_le_bytes());
    b.extend_from_slice(&map);
    let e = Journal::decode(&sealed(b));
    assert!(
        matches!(e, Err(JournalError::MapBlock { len: 6, .. })),
        "{e:?}"
    );
}

#[test]
fn files_are_written_scanned_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir_of(dir.path());
    assert!(scan(&jdir).is_empty(), "no directory: no journals");
    let a = tiny();
    let odd = Journal {
        header: Header {
            vm: "../etc/x y".into(),
            ..tiny().header
        },
        map: tiny().map,
    };
    let pa = write(&jdir, &a).unwrap();
    let pb = write(&jdir, &odd).unwrap();
    assert_eq!(pa, jdir.join("vm1.journal"));
    assert_eq!(pb.parent(), Some(jdir.as_path()));
    assert!(pb
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("x-2e2e2f"));
    std::fs::write(jdir.join("junk.journal"), b"PWMJRNL1 torn").unwrap();
    std::fs::write(jdir.join("other.txt"), b"not a journal").unwrap();
    let found = scan(&jdir);
    assert_eq!(found.len(), 3, "{found:?}");
    let ok: Vec<_> = found
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .cloned()
        .collect();
    assert!(ok.contains(&a) && ok.contains(&odd));
    let bad: Vec<_> = found.iter().filter(|(_, r)| r.is_err()).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, jdir.join("junk.journal"));
    remove(&jdir, "vm1").unwrap();
    remove(&jdir, "vm1").unwrap();
    assert!(!pa.exists());
}
