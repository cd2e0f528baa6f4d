//! Naming an allocation site in one line: the first frame in the program's own code, not
//! in the C library, the dynamic loader, the language runtime or kal's agent — so a
//! program without debug info still gets `prog+0x1189`, never `__libc_start_call_main`.

use crate::attribute::symbolize::Frame;

/// File-name prefixes of modules that are not the program's own: the C library and the
/// loader, the C++/Rust runtime pieces allocation goes through, allocators, kal's agent.
const RUNTIME: [&str; 14] = [
    "libc.so",
    "libc-",
    "ld-linux",
    "ld-",
    "libpthread",
    "libdl.so",
    "librt.so",
    "libm.so",
    "libstdc++",
    "libc++",
    "libgcc_s",
    "libjemalloc",
    "libtcmalloc",
    // kal's agent, under either of its names (`crate::agent::is_agent_file`).
    "libkal_agent",
];

/// Base name of a path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `module` (a path) belongs to the runtime rather than to the program.
pub fn is_runtime(module: &str) -> bool {
    let name = base_name(module);
    name.is_empty() || RUNTIME.iter().any(|p| name.starts_with(p))
}

/// The frame that names the site: the first in the program's own modules; failing that
/// the first with a source line, then the first that is not libc's start-up code.
pub fn pick(stack: &[Frame]) -> Option<&Frame> {
    let not_start = |f: &&Frame| !f.function.starts_with("__libc_start");
    stack
        .iter()
        .find(|f| !is_runtime(&f.module))
        .or_else(|| stack.iter().filter(not_start).find(|f| f.line > 0))
        .or_else(|| stack.iter().find(not_start))
        .or(stack.first())
}

/// `module+0xoffset` of a frame (the return address inside its module).
pub fn module_offset(f: &Frame) -> String {
    format!("{}+{:#x}", base_name(&f.module), f.offset)
}

/// One frame in one line: `function file:line`, `function (prog+0x…)` without a line
/// (`function` alone without a module), `prog+0x…` without a symbol.
pub fn describe(f: &Frame) -> String {
    let known = !f.function.is_empty() && f.function != "??";
    match (known, f.line > 0) {
        (true, true) => format!("{} {}:{}", f.function, f.file, f.line),
        (true, false) if f.module.is_empty() => f.function.clone(),
        (true, false) => format!("{} ({})", f.function, module_offset(f)),
        (false, _) if f.module.is_empty() => format!("{:#x}", f.address),
        (false, _) => module_offset(f),
    }
}

/// The site of a stack, in one line (`(no stack)` for an empty one).
pub fn where_(stack: &[Frame]) -> String {
    pick(stack)
        .map(describe)
        .unwrap_or_else(|| "(no stack)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: u32, module: &str, offset: u64) -> Frame {
        Frame {
            function: function.into(),
            file: if line > 0 {
                "/src/a.c".into()
            } else {
                String::new()
            },
            line,
            module: module.into(),
            address: 0x5555_0000_0000 + offset,
            offset,
        }
    }

    #[test]
    fn the_programs_own_frame_names_the_site() {
        let stack = [
            frame(
                "__GI___strdup",
                42,
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                0x9a9aa,
            ),
            frame("??", 0, "/tmp/prog", 0x1189),
            frame("??", 0, "/tmp/prog", 0x11c0),
            frame(
                "__libc_start_call_main",
                58,
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                0x271ca,
            ),
        ];
        assert_eq!(where_(&stack), "prog+0x1189");
        let debug = [
            frame("malloc", 0, "/x/libkal_agent.so", 0x10),
            frame("parse", 12, "/tmp/leaky", 0x11df),
        ];
        assert_eq!(where_(&debug), "parse /src/a.c:12");
        let sym = [frame("handle", 0, "/opt/lib/libplugin.so", 0x42)];
        assert_eq!(where_(&sym), "handle (libplugin.so+0x42)");
    }

    #[test]
    fn only_runtime_frames_never_name_libc_start() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let stack = [
            frame("__libc_start_call_main", 58, libc, 0x271ca),
            frame("__libc_start_main_impl", 0, libc, 0x27285),
            frame("??", 0, libc, 0x3000),
        ];
        assert_eq!(where_(&stack), "libc.so.6+0x3000");
        assert_eq!(where_(&[]), "(no stack)");
        assert!(is_runtime("/lib64/ld-linux-x86-64.so.2"));
        assert!(!is_runtime("/usr/bin/sort"));
    }
}
