//! Where the separate harnesses (fan-out, identity) put their results: a
//! JSON file and a Markdown report, named after the run's start time.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Writes `<dir>/<started, compact>-<kind>.json` and `.md`; returns the
/// report's path.
pub fn write_report(
    dir: &Path,
    started: &str,
    kind: &str,
    results: &impl Serialize,
    markdown: &str,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = started.replace([':', '-'], "");
    let base = dir.join(format!("{stamp}-{kind}"));
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(results).map_err(std::io::Error::other)?,
    )?;
    let report = base.with_extension("md");
    std::fs::write(&report, markdown)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_report_are_named_after_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let report = write_report(
            dir.path(),
            "2026-11-23T05:00:00Z",
            "identity",
            &serde_json::json!({"a": 1}),
            "# r\n",
        )
        .unwrap();
        assert_eq!(report, dir.path().join("20261123T050000Z-identity.md"));
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "# r\n");
        let json =
            std::fs::read_to_string(dir.path().join("20261123T050000Z-identity.json")).unwrap();
        assert!(json.contains("\"a\": 1"), "{json}");
    }
}
