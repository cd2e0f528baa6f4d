//! `kal run` on real programs with known leaks: exact counts, classes and file:line.

mod common;
use common::*;

#[test]
fn detached_subtree_is_one_direct_and_two_indirect() {
    let prog = build("tree.c", &[]);
    let r = run_json(&[], &prog, &[]);
    assert_eq!(totals(&r.json, "direct"), (48, 1), "{}", r.stderr);
    assert_eq!(totals(&r.json, "indirect"), (96, 2));
    assert_eq!(totals(&r.json, "possible"), (0, 0));
    let line = line_of("tree.c", "node");
    assert_eq!(sum(&records_at(&r.json, "direct", "tree.c", line)), (48, 1));
    assert_eq!(
        sum(&records_at(&r.json, "indirect", "tree.c", line)),
        (96, 2)
    );
    assert_eq!(r.out.status.code(), Some(23));
    assert!(
        r.stderr
            .contains("Direct leak of 48 bytes in 1 block allocated by calloc at:"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(&format!("tree.c:{line}")));
}

#[test]
fn unreachable_ring_has_one_leader() {
    let prog = build("ring.c", &[]);
    let r = run_json(&[], &prog, &[]);
    assert_eq!(totals(&r.json, "direct"), (40, 1), "{}", r.stderr);
    assert_eq!(totals(&r.json, "indirect"), (160, 4));
    assert_eq!(
        sum(&records_at(
            &r.json,
            "direct",
            "ring.c",
            line_of("ring.c", "ring")
        )),
        (40, 1)
    );
    assert_eq!(
        sum(&records_at(
            &r.json,
            "indirect",
            "ring.c",
            line_of("ring.c", "ringrest")
        )),
        (160, 4)
    );
}

#[test]
fn interior_pointer_is_possibly_lost() {
    let prog = build("interior.c", &[]);
    let r = run_json(&[], &prog, &[]);
    assert_eq!(totals(&r.json, "possible"), (200, 1), "{}", r.stderr);
    assert_eq!(totals(&r.json, "direct"), (0, 0));
    assert_eq!(
        sum(&records_at(
            &r.json,
            "possible",
            "interior.c",
            line_of("interior.c", "interior")
        )),
        (200, 1)
    );
    // Possibly lost alone is not "definitely lost": the program's status stands.
    assert_eq!(r.out.status.code(), Some(0));
}

#[test]
fn every_allocation_api_is_tracked() {
    let prog = build("apis.c", &[]);
    let r = run_json(&[], &prog, &[]);
    let cases = [
        ("malloc", "malloc", 11),
        ("calloc", "calloc", 21),
        ("realloc_null", "realloc", 13),
        ("realloc_grow", "realloc", 4000),
        ("reallocarray", "realloc", 15),
        ("memalign", "memalign", 19),
        ("posix_memalign", "memalign", 23),
        ("aligned_alloc", "memalign", 48),
        ("valloc", "memalign", 29),
        ("pvalloc", "memalign", 31),
    ];
    for (marker, api, size) in cases {
        let recs = records_at(&r.json, "direct", "apis.c", line_of("apis.c", marker));
        assert_eq!(sum(&recs), (size, 1), "{marker}: {}", r.stderr);
        assert_eq!(recs[0]["stack"][0]["function"], "main");
        assert_eq!(recs[0]["api"], api, "{marker}");
    }
    let total: u64 = cases.iter().map(|c| c.2).sum();
    assert_eq!(totals(&r.json, "direct"), (total, cases.len() as u64));
}

#[test]
fn four_threads_leaking_at_once() {
    let prog = build("threads.c", &[]);
    let r = run_json(&[], &prog, &[]);
    let line = line_of("threads.c", "thread_leak");
    assert_eq!(
        sum(&records_at(&r.json, "direct", "threads.c", line)),
        (10 * (100 + 101 + 102 + 103), 40),
        "{}",
        r.stderr
    );
    assert_eq!(totals(&r.json, "direct"), (4060, 40));
}

#[test]
fn leak_inside_a_dlopened_library() {
    let lib = build("libplugin.c", &["-shared", "-fPIC"]);
    let prog = build("dlopen.c", &["-ldl"]);
    let r = run_json(&[], &prog, &[lib.to_str().unwrap()]);
    let recs = records_at(
        &r.json,
        "direct",
        "libplugin.c",
        line_of("libplugin.c", "plugin"),
    );
    assert_eq!(sum(&recs), (321, 1), "{}", r.stderr);
    let f = &recs[0]["stack"][0];
    assert_eq!(f["function"], "plugin_leak");
    assert!(f["module"].as_str().unwrap().ends_with(".so"), "{f}");
    assert_eq!(totals(&r.json, "direct"), (321, 1));
}

#[test]
fn rust_mem_forget_is_a_direct_leak() {
    let prog = build("forget.rs", &[]);
    let r = run_json(&[], &prog, &[]);
    let recs = records_at(
        &r.json,
        "direct",
        "forget.rs",
        line_of("forget.rs", "forget"),
    );
    assert_eq!(sum(&recs), (1000, 1), "{}", r.stderr);
    assert_eq!(totals(&r.json, "direct"), (1000, 1));
    let names: Vec<&str> = recs[0]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("forget::main")),
        "demangled Rust names: {names:?}"
    );
}

#[test]
fn cpp_leak_with_demangled_names() {
    let prog = build("widget.cpp", &[]);
    let r = run_json(&[], &prog, &[]);
    let recs = records_at(
        &r.json,
        "direct",
        "widget.cpp",
        line_of("widget.cpp", "create"),
    );
    assert_eq!(sum(&recs), (48, 1), "{}", r.stderr);
    let names: Vec<&str> = recs[0]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert!(names.contains(&"shop::Factory::create()"), "{names:?}");
    assert_eq!(totals(&r.json, "direct"), (48, 1));
}

#[test]
fn pointers_in_tls_globals_mmap_other_stacks_and_registers_are_roots() {
    let prog = build("roots.c", &["-O2"]);
    let r = run_json(&["--show-reachable"], &prog, &[]);
    for kind in ["direct", "indirect", "possible"] {
        assert_eq!(totals(&r.json, kind), (0, 0), "{kind}: {}", r.stderr);
    }
    let sizes: Vec<u64> = r.json["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bytes"].as_u64().unwrap())
        .collect();
    for held in [101, 202, 303, 404, 505] {
        assert!(
            sizes.contains(&held),
            "block of {held} bytes should be listed as reachable: {sizes:?}"
        );
    }
    assert_eq!(r.out.status.code(), Some(0));
}

#[test]
fn counts_equal_memchecks() {
    for (name, extra) in [
        ("tree.c", vec![]),
        ("ring.c", vec![]),
        ("interior.c", vec![]),
        ("threads.c", vec![]),
        ("widget.cpp", vec![]),
        ("heuristics.cpp", vec![]),
        // What __libc_freeres and __gnu_cxx::__freeres free at exit, as memcheck runs them:
        // stdout's buffer and the C++ exception pool, the stacks (and DTVs) of joined
        // threads that glibc caches, where a stale pointer would hide a leak.
        ("cout.cpp", vec![]),
        ("exceptions.cpp", vec![]),
        ("cached_stacks.c", vec![]),
    ] {
        let prog = build(name, &extra);
        let r = run_json(&[], &prog, &[]);
        let vg = memcheck_all(&prog, &[]);
        let ours = ["direct", "indirect", "possible", "reachable"].map(|k| totals(&r.json, k));
        assert_eq!(
            ours, vg,
            "{name}: kal (direct, indirect, possible, reachable) vs memcheck"
        );
    }
}

#[test]
fn same_site_from_two_callers_is_attributed_to_each() {
    let prog = build("callers.c", &["-fno-inline"]);
    let r = run_json(&[], &prog, &[]);
    let site = line_of("callers.c", "alloc_here");
    assert_eq!(
        sum(&records_at(&r.json, "direct", "callers.c", site)),
        (100, 10),
        "{}",
        r.stderr
    );
    assert_eq!(
        sum(&records_at(
            &r.json,
            "direct",
            "callers.c",
            line_of("callers.c", "from_a")
        )),
        (50, 5)
    );
    assert_eq!(
        sum(&records_at(
            &r.json,
            "direct",
            "callers.c",
            line_of("callers.c", "from_b")
        )),
        (50, 5)
    );
}

#[test]
fn c_names_are_not_demangled_as_types() {
    let prog = build("short_names.c", &["-O1"]);
    let r = run_json(&[], &prog, &[]);
    assert_eq!(totals(&r.json, "direct"), (66, 3), "{}", r.stderr);
    for (func, marker, bytes) in [("f", "in_f", 11), ("i", "in_i", 22), ("d", "in_d", 33)] {
        let line = line_of("short_names.c", marker);
        let recs = records_at(&r.json, "direct", "short_names.c", line);
        assert_eq!(sum(&recs), (bytes, 1), "{}", r.stderr);
        let names: Vec<&str> = recs[0]["stack"]
            .as_array()
            .expect("a stack")
            .iter()
            .filter_map(|f| f["function"].as_str())
            .collect();
        assert_eq!(names.first().copied(), Some(func), "{names:?}");
        assert!(
            !names.iter().any(|n| ["float", "int", "double"].contains(n)),
            "{names:?}"
        );
    }
    assert!(!r.stderr.contains("float"), "{}", r.stderr);
}

#[test]
fn agent_takes_no_pthread_key_and_reuses_dead_threads_stacks() {
    let prog = build("keys_churn.c", &["-pthread"]);
    let plain = std::process::Command::new(&prog)
        .arg("0")
        .output()
        .expect("run keys_churn");
    let plain = String::from_utf8_lossy(&plain.stdout).to_string();
    assert!(plain.starts_with("keys "), "{plain}");
    // 3,000 threads one after another: more than the agent has side stacks (2,048).
    let r = run_json(&[], &prog, &["3000"]);
    let out = String::from_utf8_lossy(&r.out.stdout).to_string();
    assert_eq!(out.lines().next(), plain.lines().next(), "{}", r.stderr);
    let line = line_of("keys_churn.c", "churn_leak");
    assert_eq!(
        sum(&records_at(&r.json, "direct", "keys_churn.c", line)),
        (24 * 3000, 3000),
        "{}",
        r.stderr
    );
    assert_eq!(totals(&r.json, "direct"), (24 * 3000, 3000));
    // Dead threads' side stacks and caches were reused, not one per thread.
    let agent = r.json["memory"]["agent_bytes"]
        .as_u64()
        .expect("agent_bytes");
    assert!(agent < 16 << 20, "agent uses {agent} bytes");
}

#[test]
fn a_program_with_its_own_malloc_is_told_it_is_not_tracked() {
    let prog = build("own_malloc.c", &[]);
    let r = run_json(&[], &prog, &[]);
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("defines its own"))
        .unwrap_or_else(|| panic!("no line about its own malloc: {}", r.stderr));
    assert!(line.contains("malloc/free/calloc/realloc"), "{line}");
    assert!(line.contains("not tracked"), "{line}");
    // A normal program gets no such line.
    let plain = build("tree.c", &[]);
    let r = run_json(&[], &plain, &[]);
    assert!(!r.stderr.contains("defines its own"), "{}", r.stderr);
}

#[test]
fn a_program_whose_path_holds_a_newline_keeps_its_symbols() {
    let prog = build("tree.c", &[]);
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("new\nline dir");
    std::fs::create_dir(&odd).unwrap();
    let copy = odd.join("tree");
    std::fs::copy(&prog, &copy).unwrap();
    let r = run_json(&[], &copy, &[]);
    let line = line_of("tree.c", "node");
    assert_eq!(
        sum(&records_at(&r.json, "direct", "tree.c", line)),
        (48, 1),
        "{}",
        r.stderr
    );
}

#[test]
fn no_freeres_leaves_the_runtimes_caches_reachable() {
    let prog = build("cout.cpp", &[]);
    let with = run_json(&[], &prog, &[]);
    assert_eq!(totals(&with.json, "reachable"), (0, 0), "{}", with.stderr);
    let without = run_json(&["--no-freeres"], &prog, &[]);
    // libstdc++'s emergency exception pool (72,704 bytes) and stdout's buffer (a pipe's
    // 4,096) stay allocated; the leak is the same.
    assert_eq!(
        totals(&without.json, "reachable"),
        (72704 + 4096, 2),
        "{}",
        without.stderr
    );
    assert_eq!(totals(&without.json, "direct"), (33, 1));
    assert_eq!(totals(&with.json, "direct"), (33, 1));
}
