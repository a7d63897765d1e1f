# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run): command echo / dry run, errors.
#
#   DRY_RUN=1   run_cmd prints each command (shell-quoted, one line, prefixed "+ ") instead of running it

DRY_RUN="${DRY_RUN:-0}"

die() { echo "[$(basename "$0")] error: $*" >&2; exit 2; }
log() { echo "[$(basename "$0")] $*" >&2; }

# One word, quoted for a POSIX shell: as is when it holds only safe characters, else in single
# quotes (an embedded ' becomes '\'').
quote_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints "+ CMD ARGS..." with every word quoted, so the line can be pasted into a shell.
print_cmd() {
  echo "+ $(quote_words "$@")"
}

# Runs the command (printing it first), or only prints it under --dry-run.
run_cmd() {
  print_cmd "$@"
  if [[ "${DRY_RUN}" != 1 ]]; then
    "$@"
  fi
}

# Checks "KEY=VALUE" for --env (KEY a shell variable name).
check_env_assignment() {
  [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env '$1': expected KEY=VALUE (KEY a variable name)"
}

# Shell-quotes a list of words into one string (for a remote --command or bash -c).
quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "${word}")"
  done
  echo "${out}"
}

# header_usage FILE: the script's leading comment block (from line 2 to the first line that is not a
# comment), without the "# ", on stderr: every launcher's --help.
header_usage() {
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$1" >&2
}
