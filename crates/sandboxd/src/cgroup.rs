//! cgroups: a local sandbox's own (its CPU and memory limits, its usage, the freezer that
//! pauses it) and a container's own (what envd in a pod reports as metrics).
//!
//! Written on the files directly rather than through cgroups-rs: the server needs a few
//! files of four v1 controllers, placed under its *own* cgroup in each hierarchy (the
//! machine's manager owns the rest), and the file a process joins through must be opened
//! before the fork so the child can join with one `write` and no allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The v1 controllers a sandbox's group lives in.
const CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "freezer"];
/// CFS period; a quota of `cpu_count` periods is `cpu_count` CPUs.
const CPU_PERIOD_US: u64 = 100_000;

/// Where this server's sandboxes' groups go: one directory per controller under the
/// server's own cgroup in that hierarchy. Only cgroup v1 with every controller mounted
/// and writable is used; elsewhere limits are not enforced and the server says so.
#[derive(Clone, Debug)]
pub struct Cgroups {
    parents: BTreeMap<&'static str, PathBuf>,
}

impl Cgroups {
    /// Finds the server's own groups and makes its parent group in each, named after the
    /// server's pid and its start in this process, so that no two servers (on one machine,
    /// or in one test process) share one, nor remove it from under each other.
    pub fn prepare() -> Result<Cgroups, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|error| format!("cannot read /proc/self/cgroup: {error}"))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|error| format!("cannot read /proc/self/mountinfo: {error}"))?;
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sandcastle-{}-{start}", std::process::id());
        let mut parents = BTreeMap::new();
        for controller in CONTROLLERS {
            let dir = own_group(&own, &mountinfo, controller).ok_or_else(|| {
                format!("no cgroup v1 hierarchy with the {controller} controller is mounted")
            })?;
            let parent = dir.join(&name);
            std::fs::create_dir_all(&parent)
                .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
            parents.insert(controller, parent);
        }
        Ok(Cgroups { parents })
    }

    /// Makes a sandbox's group with its limits.
    pub fn create(&self, id: &str, cpu_count: u32, memory_mb: u32) -> std::io::Result<Group> {
        let mut dirs = BTreeMap::new();
        for (controller, parent) in &self.parents {
            let dir = parent.join(id);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                // cpu and cpuacct may share one hierarchy, and so one directory.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
            dirs.insert(*controller, dir);
        }
        let group = Group { dirs };
        if memory_mb > 0 {
            let bytes = u64::from(memory_mb) << 20;
            group.write("memory", "memory.limit_in_bytes", &bytes.to_string())?;
            // Without swap accounting the file is absent and swap is not counted.
            let _ = group.write("memory", "memory.memsw.limit_in_bytes", &bytes.to_string());
        }
        if cpu_count > 0 {
            group.write("cpu", "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            let quota = u64::from(cpu_count) * CPU_PERIOD_US;
            group.write("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
        }
        Ok(group)
    }

    /// Removes the server's parent groups; called when it stops, after its sandboxes.
    pub fn remove(&self) {
        for parent in self.parents.values() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The server's own group in the v1 hierarchy that holds `controller`.
fn own_group(own: &str, mountinfo: &str, controller: &str) -> Option<PathBuf> {
    let path = own.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers
            .split(',')
            .any(|name| name == controller)
            .then(|| path.to_string())
    })?;
    mountinfo.lines().find_map(|line| {
        let (mount, options) = line.split_once(" - ")?;
        let mut options = options.split(' ');
        if options.next()? != "cgroup" {
            return None;
        }
        let _source = options.next()?;
        if !options
            .next()?
            .split(',')
            .any(|option| option == controller)
        {
            return None;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        let (root, mountpoint) = (fields.get(3)?, fields.get(4)?);
        let relative = Path::new(&path).strip_prefix(root).ok()?;
        Some(Path::new(mountpoint).join(relative))
    })
}

/// One sandbox's group, a directory per controller.
#[derive(Debug)]
pub struct Group {
    dirs: BTreeMap<&'static str, PathBuf>,
}

/// What a group has used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub cache_bytes: u64,
    /// `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// Processes the kernel killed for reaching the memory limit.
    pub oom_kills: u64,
}

impl Group {
    fn write(&self, controller: &str, file: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.dirs[controller].join(file), value)
    }

    fn read(&self, controller: &str, file: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.dirs[controller].join(file))
    }

    /// The files a new process writes `0` to, before it execs, to join every controller.
    pub fn join_files(&self) -> std::io::Result<Vec<File>> {
        let mut unique: Vec<&PathBuf> = self.dirs.values().collect();
        unique.dedup();
        unique
            .into_iter()
            .map(|dir| File::options().write(true).open(dir.join("cgroup.procs")))
            .collect()
    }

    pub fn usage(&self) -> std::io::Result<Usage> {
        let cpu_ns = self
            .read("cpuacct", "cpuacct.usage")?
            .trim()
            .parse()
            .unwrap_or(0);
        let stat = self.read("memory", "memory.stat")?;
        Ok(Usage {
            cpu_ns,
            memory_bytes: self
                .read("memory", "memory.usage_in_bytes")?
                .trim()
                .parse()
                .unwrap_or(0),
            cache_bytes: stat_value(&stat, "cache").unwrap_or(0),
            memory_limit: self
                .read("memory", "memory.limit_in_bytes")?
                .trim()
                .parse()
                .ok()
                .filter(|limit| *limit < (1 << 60)),
            oom_kills: stat_value(&self.read("memory", "memory.oom_control")?, "oom_kill")
                .unwrap_or(0),
        })
    }

    /// Freezes (or thaws) every process of the group and waits until the kernel says so,
    /// which takes microseconds unless a process is stuck in the kernel.
    pub fn freeze(&self, frozen: bool) -> std::io::Result<()> {
        let want = if frozen { "FROZEN" } else { "THAWED" };
        self.write("freezer", "freezer.state", want)?;
        for _ in 0..200 {
            if self.read("freezer", "freezer.state")?.trim() == want {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(std::io::Error::other(format!(
            "the freezer did not reach {want} within 2 s"
        )))
    }

    /// Removes the group once its processes are gone; they may take a moment to exit
    /// after SIGKILL, and a frozen group must be thawed for them to die.
    pub async fn remove(&self) {
        let _ = self.write("freezer", "freezer.state", "THAWED");
        for _ in 0..100 {
            let mut left = false;
            for dir in self.dirs.values() {
                if dir.exists() && std::fs::remove_dir(dir).is_err() {
                    left = true;
                }
            }
            if !left {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::warn!(groups = ?self.dirs.values().collect::<Vec<_>>(), "a sandbox's cgroups are still busy; left in place");
    }
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// The usage of the container envd runs in, from its own cgroup as mounted inside the
/// container: v2 when `/sys/fs/cgroup/cgroup.controllers` exists, else v1.
pub fn container_usage(root: &Path) -> std::io::Result<Usage> {
    let read = |file: &str| std::fs::read_to_string(root.join(file));
    if root.join("cgroup.controllers").exists() {
        let stat = read("memory.stat")?;
        let cpu = read("cpu.stat")?;
        let events = read("memory.events").unwrap_or_default();
        return Ok(Usage {
            cpu_ns: stat_value(&cpu, "usage_usec").unwrap_or(0) * 1000,
            memory_bytes: read("memory.current")?.trim().parse().unwrap_or(0),
            cache_bytes: stat_value(&stat, "file").unwrap_or(0),
            memory_limit: read("memory.max")?.trim().parse().ok(),
            oom_kills: stat_value(&events, "oom_kill").unwrap_or(0),
        });
    }
    // gVisor's emulated memory controller has no memory.stat and no oom_control.
    let stat = read("memory/memory.stat").unwrap_or_default();
    Ok(Usage {
        cpu_ns: read("cpuacct/cpuacct.usage")?.trim().parse().unwrap_or(0),
        memory_bytes: read("memory/memory.usage_in_bytes")?
            .trim()
            .parse()
            .unwrap_or(0),
        cache_bytes: stat_value(&stat, "cache").unwrap_or(0),
        memory_limit: read("memory/memory.limit_in_bytes")?
            .trim()
            .parse()
            .ok()
            .filter(|limit| *limit < (1 << 60)),
        oom_kills: stat_value(
            &read("memory/memory.oom_control").unwrap_or_default(),
            "oom_kill",
        )
        .unwrap_or(0),
    })
}

/// The CPUs a container may use, from its CFS quota; 1 when it has none.
pub fn container_cpus(root: &Path) -> u32 {
    let read = |file: &str| std::fs::read_to_string(root.join(file)).ok();
    let (quota, period) = if let Some(max) = read("cpu.max") {
        let mut parts = max.split_whitespace();
        (
            parts.next().and_then(|quota| quota.parse::<u64>().ok()),
            parts.next().and_then(|period| period.parse::<u64>().ok()),
        )
    } else {
        (
            read("cpu/cpu.cfs_quota_us").and_then(|quota| quota.trim().parse::<u64>().ok()),
            read("cpu/cpu.cfs_period_us").and_then(|period| period.trim().parse::<u64>().ok()),
        )
    };
    match (quota, period) {
        (Some(quota), Some(period)) if period > 0 => quota.div_ceil(period).max(1) as u32,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str =
        "9:name=systemd:/\n6:freezer:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n";
    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory
32 25 0:28 /nested /sys/fs/cgroup/freezer rw,relatime shared:11 - cgroup cgroup rw,freezer
33 25 0:29 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
";

    #[test]
    fn the_own_group_is_found_per_controller_under_its_mount() {
        assert_eq!(
            own_group(OWN, MOUNTINFO, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            own_group(OWN, MOUNTINFO, "cpuacct"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        // A group outside the mount's root cannot be reached from here.
        assert_eq!(own_group(OWN, MOUNTINFO, "freezer"), None);
        assert_eq!(own_group(OWN, MOUNTINFO, "pids"), None);
    }

    #[test]
    fn stat_files_are_read_by_key() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(stat_value(text, "oom_kill"), Some(3));
        assert_eq!(stat_value(text, "missing"), None);
    }
}
