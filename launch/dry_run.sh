# Shared by the launch shell scripts (source it): DRY_RUN=1 prints commands instead of running them.

# Prints a command with shell quoting where needed (the dry-run format).
show_cmd() {
  local out=() arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("${arg}")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    show_cmd "$@"
  else
    "$@"
  fi
}
