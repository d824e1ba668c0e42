"""What every layer uses: errors, atomic files, typed records, config knobs, the device, CPU threads on a busy
machine, DDP, and glibc's heap."""
