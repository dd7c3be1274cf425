//! What every command line of the project promises, checked by each binary's tests: each flag can
//! also come from the environment (a Helm chart or a CI job sets them that way).

/// The flags of `command` and its subcommands, by path (`switchyard local --loadtest`), that have
/// no environment fallback; help, version and positional arguments aside.
pub fn without_env(command: &clap::Command) -> Vec<String> {
    let mut missing = Vec::new();
    collect_without_env(command, command.get_name(), &mut missing);
    missing
}

fn collect_without_env(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") || arg.is_positional() || arg.get_env().is_some() {
            continue;
        }
        missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
    }
    for subcommand in command.get_subcommands() {
        collect_without_env(subcommand, &format!("{path} {}", subcommand.get_name()), missing);
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction, Command};

    #[test]
    fn names_each_flag_without_an_env_fallback_by_its_path() {
        let command = Command::new("tool")
            .arg(Arg::new("listen").long("listen").env("TOOL_LISTEN"))
            .arg(Arg::new("input"))
            .subcommand(Command::new("run").arg(Arg::new("fast").long("fast").action(ArgAction::SetTrue)));
        assert_eq!(super::without_env(&command), ["tool run --fast"]);
    }
}
