//! The engine's compute threads: how many by default, and the pool the
//! engine thread runs its steps in (so two engines in one process, or an
//! engine and the caller's own rayon work, do not share one global pool).

use std::collections::HashSet;

/// Physical cores this process may run on: distinct (package, core) pairs
/// among the CPUs of its affinity mask (hyperthread siblings share a core,
/// and ALU-bound kernels gain little from the second thread of one), capped
/// by the CPU quota `available_parallelism` sees. Falls back to that count
/// where the topology cannot be read.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    linux_cores().map_or(logical, |c| c.clamp(1, logical))
}

fn linux_cores() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    let mut cores = HashSet::new();
    for cpu in parse_cpu_list(allowed.trim())? {
        let topo = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let read = |f: &str| {
            std::fs::read_to_string(format!("{topo}/{f}"))
                .ok()
                .map(|s| s.trim().to_string())
        };
        cores.insert((read("physical_package_id")?, read("core_id")?));
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// A kernel CPU list such as `0-3,8,10-11`.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("0-x"), None);
    }

    #[test]
    fn physical_cores_fit_the_logical_ones() {
        let logical = std::thread::available_parallelism().unwrap().get();
        let c = physical_cores();
        assert!(c >= 1 && c <= logical, "{c} cores of {logical} CPUs");
    }
}
