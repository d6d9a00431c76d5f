//! Manual pages, made from what they describe so they cannot drift from it:
//!
//! - `siterelay(8)` and one `siterelay-<command>(8)` per subcommand, from the clap definition
//!   (`clap_mangen`);
//! - `siterelay.toml(5)`, from `docs/configuration.md` (compiled in) by [`markdown_to_roff`], a
//!   converter for the Markdown that file uses: headings, paragraphs, lists, code blocks,
//!   tables (each row becomes a tagged paragraph), inline code, bold and links.
//!
//! `siterelay manpages --out DIR` (hidden) writes them all; the Debian package installs them
//! (image-build/build-deb.sh). `tests/manpages.rs` renders each with `man` and checks that every
//! configuration key of docs/configuration.md is in `siterelay.toml(5)`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The configuration reference the `siterelay.toml(5)` page is made from.
pub const CONFIGURATION_MD: &str = include_str!("../docs/configuration.md");

/// Write `siterelay.8`, a `siterelay-<command>.8` for every visible subcommand, and
/// `siterelay.toml.5` into `dir`; returns the files written.
pub fn write_all(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    let subcommands: Vec<String> = visible_subcommands(&cmd, "siterelay");
    write_command_pages(&cmd, "siterelay", dir, &subcommands, &mut written)?;
    let toml = dir.join("siterelay.toml.5");
    std::fs::write(&toml, config_page(env!("CARGO_PKG_VERSION")))?;
    written.push(toml);
    Ok(written)
}

/// `siterelay-queue-held-list` and so on: every visible command below `cmd`, depth first.
fn visible_subcommands(cmd: &clap::Command, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("{prefix}-{}", sub.get_name());
        names.push(name.clone());
        names.extend(visible_subcommands(sub, &name));
    }
    names
}

fn write_command_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    all: &[String],
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page_cmd = cmd.clone();
    let man = clap_mangen::Man::new(page_cmd)
        .section("8")
        .manual("siterelay manual")
        .source(format!("siterelay {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    // Keep option names whole: no hyphenation, no stretched lines.
    out.extend_from_slice(b".nh\n.ad l\n");
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    if name == "siterelay" {
        out.extend_from_slice(
            b".SH FILES\n.TP\n\\fI/etc/siterelay/siterelay.toml\\fR\nThe configuration (see \\fBsiterelay.toml\\fR(5)); \\fB\\-\\-config\\fR or \\fBSITERELAY_CONFIG\\fR for another.\n.TP\n\\fI/etc/siterelay/tls/\\fR\nThe broker CA, this box's client certificate and its key (\\fBsiterelay enrol\\fR).\n.TP\n\\fI/var/lib/siterelay/\\fR\nThe outbox (patient data; mode 0700, owned by siterelay) and the status socket.\n.TP\n\\fI/usr/share/doc/siterelay/\\fR\nOperations, configuration, contract, security and broker documentation.\n",
        );
    }
    out.extend_from_slice(b".SH \"SEE ALSO\"\n");
    let mut see: Vec<String> = vec!["\\fBsiterelay.toml\\fR(5)".into()];
    if name != "siterelay" {
        see.push("\\fBsiterelay\\fR(8)".into());
    }
    for other in all
        .iter()
        .filter(|o| o.starts_with(&format!("{name}-")) && o[name.len() + 1..].find('-').is_none())
    {
        see.push(format!("\\fB{}\\fR(8)", other.replace('-', "\\-")));
    }
    see.push("\\fBsystemctl\\fR(1)".into());
    writeln!(out, "{}", see.join(",\n"))?;
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    let file = dir.join(format!("{name}.8"));
    std::fs::write(&file, out)?;
    written.push(file);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_command_pages(
            sub,
            &format!("{name}-{}", sub.get_name()),
            dir,
            all,
            written,
        )?;
    }
    Ok(())
}

/// The command without its hidden subcommands (the packaging ones), for the shell completions:
/// clap_complete offers hidden subcommands too, and clap cannot remove one, so the top level is
/// rebuilt from its visible parts (name, version, about, arguments, subcommands).
pub fn without_hidden_subcommands(cmd: &clap::Command) -> clap::Command {
    let mut c = clap::Command::new("siterelay")
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(cmd.is_subcommand_required_set());
    if cmd.get_version().is_some() {
        c = c.version(env!("CARGO_PKG_VERSION"));
    }
    if let Some(a) = cmd.get_about() {
        c = c.about(a.clone());
    }
    c
}

/// `siterelay.toml(5)`.
pub fn config_page(version: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH SITERELAY.TOML 5 \"\" \"siterelay {version}\" \"siterelay manual\"\n.nh\n.ad l\n.SH NAME\nsiterelay.toml \\- siterelay configuration file\n.SH SYNOPSIS\n\\fI/etc/siterelay/siterelay.toml\\fR\n.SH DESCRIPTION\n"
    ));
    out.push_str(&markdown_to_roff(CONFIGURATION_MD));
    out.push_str(".SH \"SEE ALSO\"\n\\fBsiterelay\\fR(8), \\fBsiterelay\\-check\\-config\\fR(8), /usr/share/doc/siterelay/siterelay.example.toml\n");
    out
}

/// Roff for the Markdown of docs/configuration.md (the top-level `#` title is left out: the page
/// has its own NAME).
pub fn markdown_to_roff(md: &str) -> String {
    let mut out = String::new();
    let lines: Vec<&str> = md.lines().collect();
    let mut i = 0;
    let mut in_paragraph = false;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("```") {
            let _ = rest;
            out.push_str(".PP\n.RS 4\n.nf\n");
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                out.push_str(&escape_line(&escape_text(lines[i])));
                out.push('\n');
                i += 1;
            }
            out.push_str(".fi\n.RE\n");
            in_paragraph = false;
            i += 1;
            continue;
        }
        if line.starts_with("# ") {
            i += 1;
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            out.push_str(&format!(".SH \"{}\"\n", heading(h).to_uppercase()));
            in_paragraph = false;
            i += 1;
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            out.push_str(&format!(".SS \"{}\"\n", heading(h)));
            in_paragraph = false;
            i += 1;
            continue;
        }
        if trimmed.starts_with('|') {
            let mut rows = Vec::new();
            while i < lines.len() && lines[i].trim_start().starts_with('|') {
                rows.push(cells(lines[i]));
                i += 1;
            }
            table(&rows, &mut out);
            in_paragraph = false;
            continue;
        }
        if line.trim().is_empty() {
            in_paragraph = false;
            i += 1;
            continue;
        }
        if let Some(item) = list_item(line) {
            // The item and its indented continuation lines.
            let mut text = item.to_string();
            i += 1;
            while i < lines.len()
                && lines[i].starts_with("  ")
                && !lines[i].trim().is_empty()
                && list_item(lines[i]).is_none()
            {
                text.push(' ');
                text.push_str(lines[i].trim());
                i += 1;
            }
            out.push_str(".IP \\(bu 2\n");
            out.push_str(&escape_line(&inline(&text)));
            out.push('\n');
            in_paragraph = true;
            continue;
        }
        if !in_paragraph {
            out.push_str(".PP\n");
            in_paragraph = true;
        }
        out.push_str(&escape_line(&inline(line.trim())));
        out.push('\n');
        i += 1;
    }
    out
}

fn list_item(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix("- ") {
        return Some(rest);
    }
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 {
        return t[digits..].strip_prefix(". ");
    }
    None
}

/// A heading's text without Markdown marks (the heading line of `.SH` / `.SS`, quoted).
fn heading(h: &str) -> String {
    let plain: String = strip_links(h).chars().filter(|c| *c != '`').collect();
    escape_text(&plain).replace('"', "\\(dq")
}

/// The cells of a table row (`|` inside backticks does not split).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut in_code = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                in_code = !in_code;
                cur.push(c);
            }
            '\\' if chars.peek() == Some(&'|') => {
                cur.push('|');
                chars.next();
            }
            '|' if !in_code => {
                cells.push(cur.trim().to_string());
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    cells.push(cur.trim().to_string());
    cells
}

/// A table: each row a tagged paragraph, its first cell the tag, the other cells under it as
/// `Header: value`.
fn table(rows: &[Vec<String>], out: &mut String) {
    let Some(header) = rows.first() else { return };
    for row in rows.iter().skip(1) {
        if row
            .iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')))
        {
            continue;
        }
        out.push_str(".TP\n");
        let tag = row.first().map(String::as_str).unwrap_or("");
        out.push_str(&escape_line(&inline(if tag.is_empty() {
            "-"
        } else {
            tag
        })));
        out.push('\n');
        let mut first = true;
        for (h, c) in header.iter().zip(row.iter()).skip(1) {
            if c.is_empty() {
                continue;
            }
            if !first {
                out.push_str(".br\n");
            }
            first = false;
            let line = format!("{}: {}", inline(h), inline(c));
            out.push_str(&escape_line(&line));
            out.push('\n');
        }
    }
}

/// `[text](target)` as `text`.
fn strip_links(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find("](") else { break };
        let Some(end) = after[close + 2..].find(')') else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&after[..close]);
        rest = &after[close + 2 + end + 1..];
    }
    out.push_str(rest);
    out
}

/// Inline Markdown (code, bold, links) to roff fonts, text escaped.
fn inline(s: &str) -> String {
    let s = strip_links(s);
    let mut out = String::new();
    let mut rest = s.as_str();
    loop {
        let code = rest.find('`');
        let bold = rest.find("**");
        match (code, bold) {
            (Some(c), b) if b.is_none_or(|b| c < b) => {
                let Some(end) = rest[c + 1..].find('`') else {
                    out.push_str(&escape_text(rest));
                    break;
                };
                out.push_str(&escape_text(&rest[..c]));
                out.push_str("\\fB");
                out.push_str(&escape_text(&rest[c + 1..c + 1 + end]));
                out.push_str("\\fR");
                rest = &rest[c + 1 + end + 1..];
            }
            (_, Some(b)) => {
                let Some(end) = rest[b + 2..].find("**") else {
                    out.push_str(&escape_text(rest));
                    break;
                };
                out.push_str(&escape_text(&rest[..b]));
                out.push_str("\\fB");
                out.push_str(&escape_text(&rest[b + 2..b + 2 + end]).replace("`", ""));
                out.push_str("\\fR");
                rest = &rest[b + 2 + end + 2..];
            }
            _ => {
                out.push_str(&escape_text(rest));
                break;
            }
        }
    }
    out
}

/// Text escaped for roff: backslashes, dashes (kept as typed: `\-`), and the characters groff
/// would not take from a Latin-1 reading written as named glyphs.
fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '\u{2014}' => out.push_str("\\(em"),
            '\u{2013}' => out.push_str("\\(en"),
            '\u{2192}' => out.push_str("\\(->"),
            '\u{2190}' => out.push_str("\\(<-"),
            '\u{00d7}' => out.push_str("\\(mu"),
            '\u{2264}' => out.push_str("\\(<="),
            '\u{2265}' => out.push_str("\\(>="),
            '\u{2026}' => out.push_str("..."),
            '\u{2018}' | '\u{2019}' => out.push('\''),
            '\u{201c}' | '\u{201d}' => out.push('"'),
            '\u{00a0}' => out.push_str("\\ "),
            c if c.is_ascii() => out.push(c),
            c => out.push_str(&format!("\\[u{:04X}]", c as u32)),
        }
    }
    out
}

/// A line that roff would take as a request (leading `.` or `'`) made text.
fn escape_line(s: &str) -> String {
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_become_tagged_paragraphs_with_their_headers() {
        let r = markdown_to_roff(
            "## `[log]`\n\n| Key | Type | Default | Meaning |\n|---|---|---|---|\n| `level` | string | `\"info\"` | Filter, e.g. `a|b`. |\n",
        );
        assert!(r.contains(".SH \"[LOG]\""), "{r}");
        assert!(r.contains(".TP\n\\fBlevel\\fR\nType: string\n.br\nDefault: \\fB\"info\"\\fR\n.br\nMeaning: Filter, e.g. \\fBa|b\\fR.\n"), "{r}");
    }

    #[test]
    fn a_line_starting_with_a_dot_is_text_and_backslashes_are_escaped() {
        let r = markdown_to_roff("text\n.hidden \\n request\n");
        assert!(r.contains("\\&.hidden \\en request"), "{r}");
    }

    #[test]
    fn code_blocks_are_kept_as_typed() {
        let r = markdown_to_roff("```toml\n[mqtt]\nhost = \"a-b\"\n```\n");
        assert!(r.contains(".nf\n[mqtt]\nhost = \"a\\-b\"\n.fi\n"), "{r}");
    }
}
