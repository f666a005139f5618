//! YAML recipes: `sdkit <command> --config recipe.yaml` reads a mapping whose keys are
//! the command's long flag names (`resolution: 768`, `flip: true`, `caption-ext:
//! [.txt]`) and turns it into flags placed before the command-line ones, so flags given
//! on the command line win. One set of names, one validation: clap's.

use anyhow::{Context, bail};
use std::ffi::OsString;
use std::path::Path;

/// Expands every `--config FILE` of `args` (the full argv) into flags.
pub fn expand(args: Vec<OsString>, cmd: &clap::Command) -> anyhow::Result<Vec<OsString>> {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
    else {
        return Ok(args);
    };
    let (file, consumed) = match args[pos].to_string_lossy().strip_prefix("--config=") {
        Some(f) => (OsString::from(f), 1),
        None => match args.get(pos + 1) {
            Some(f) => (f.clone(), 2),
            None => bail!("--config needs a file"),
        },
    };
    // The subcommand is the first argument after the program that is not a flag.
    let Some(sub_pos) = args
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
        .map(|p| p + 1)
    else {
        bail!("--config must follow a command, e.g. sdkit prep --config recipe.yaml");
    };
    let sub_name = args[sub_pos].to_string_lossy().into_owned();
    let Some(sub) = cmd.find_subcommand(&sub_name) else {
        return Ok(args);
    };
    let flags = recipe_flags(Path::new(&file), sub)?;
    let mut out: Vec<OsString> = Vec::with_capacity(args.len() + flags.len());
    for (i, a) in args.into_iter().enumerate() {
        if i >= pos && i < pos + consumed {
            continue;
        }
        out.push(a);
        if i == sub_pos {
            out.extend(flags.iter().cloned());
        }
    }
    expand(out, cmd)
}

/// Flags for one recipe file, validated against the command's arguments.
pub fn recipe_flags(file: &Path, sub: &clap::Command) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read recipe", file.display()))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not valid YAML", file.display()))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return Ok(vec![]),
        _ => bail!(
            "{}: a recipe is a mapping of option names to values",
            file.display()
        ),
    };
    let mut flags = Vec::new();
    let mut positionals = Vec::new();
    for (k, v) in map {
        let key = k.as_str().map(|s| s.replace('_', "-")).unwrap_or_default();
        let arg = sub.get_arguments().find(|a| {
            a.get_long() == Some(key.as_str())
                || (a.is_positional() && a.get_id().as_str().replace('_', "-") == key)
        });
        let Some(arg) = arg else {
            bail!(
                "{}: unknown option '{key}' for sdkit {} (see sdkit {} --help)",
                file.display(),
                sub.get_name(),
                sub.get_name()
            );
        };
        let values: Vec<String> = match &v {
            serde_yaml::Value::Sequence(s) => s.iter().map(scalar).collect::<Result<_, _>>(),
            other => scalar(other).map(|s| vec![s]),
        }
        .map_err(|e| anyhow::anyhow!("{}: option '{key}': {e}", file.display()))?;
        if arg.is_positional() {
            positionals.extend(values.into_iter().map(OsString::from));
            continue;
        }
        let is_switch = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        if is_switch {
            match v {
                serde_yaml::Value::Bool(true) => flags.push(OsString::from(format!("--{key}"))),
                serde_yaml::Value::Bool(false) | serde_yaml::Value::Null => {}
                _ => bail!(
                    "{}: option '{key}' is a switch: use true or false",
                    file.display()
                ),
            }
            continue;
        }
        for val in values {
            flags.push(OsString::from(format!("--{key}={val}")));
        }
    }
    flags.extend(positionals);
    Ok(flags)
}

fn scalar(v: &serde_yaml::Value) -> Result<String, String> {
    match v {
        serde_yaml::Value::String(s) => Ok(s.clone()),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        _ => Err("expected a single value or a list of values".into()),
    }
}
