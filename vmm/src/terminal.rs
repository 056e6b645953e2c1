//! Raw terminal mode for the serial console when stdin is a terminal, restored on every way out
//! (normal exit, errors, signals through the main loop, panics through the hook).

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

fn restore_saved() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(termios) = saved {
        // SAFETY: fd 0 and a termios previously filled by tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios) };
    }
}

/// While alive, stdin is in raw mode (if it is a terminal at all).
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    pub fn enable() -> Self {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return RawTerminal { active: false };
        }
        // SAFETY: termios is plain data, filled by tcgetattr before any use.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `termios` is a valid out-pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut termios) } != 0 {
            log::warn!(
                "cannot read terminal settings: {}",
                std::io::Error::last_os_error()
            );
            return RawTerminal { active: false };
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(termios);
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous_hook(info);
        }));
        let mut raw = termios;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing: the guest's "\n" stays a newline on our terminal too.
        raw.c_oflag = termios.c_oflag;
        // SAFETY: fd 0 is a terminal and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            log::warn!(
                "cannot put the terminal in raw mode: {}",
                std::io::Error::last_os_error()
            );
        }
        RawTerminal { active: true }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            restore_saved();
        }
    }
}
