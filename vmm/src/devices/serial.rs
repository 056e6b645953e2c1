//! COM1: a 16550A (vm-superio) whose output goes to stdout as the guest writes it and whose input
//! comes from stdin through the main loop.

use std::io::{self, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the main loop that the guest drained the receive FIFO, so more input can go in.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal drained input: {e}");
        }
    }
}

/// Stdout, flushed after every write: a prompt without a newline must show at once.
pub struct ConsoleOut;

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

pub struct SerialConsole<W: Write + Send> {
    serial: Serial<IrqTrigger, InputDrained, W>,
}

impl<W: Write + Send> SerialConsole<W> {
    pub const LEN: u64 = 8;

    pub fn new(irq: EventFd, drained: EventFd, out: W) -> Self {
        SerialConsole {
            serial: Serial::with_events(IrqTrigger(irq), InputDrained(drained), out),
        }
    }

    /// Queues guest input; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    pub fn writer(&self) -> &W {
        self.serial.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= Self::LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= Self::LEN {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::warn!("serial: write to register {offset} failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn output_reaches_the_writer_and_input_is_bounded_by_the_fifo() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut console = SerialConsole::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Vec::new(),
        );
        for b in b"hi\n" {
            console.write(0, &[*b]);
        }
        assert_eq!(console.writer(), b"hi\n");
        // Enable the received-data interrupt, then feed more than the FIFO holds.
        console.write(1, &[0x01]);
        let input = [b'x'; 100];
        let n = console.enqueue_input(&input);
        assert!(n > 0 && n < input.len(), "FIFO took {n}");
        assert_eq!(console.enqueue_input(&input), 0);
        assert!(irq.read().unwrap() >= 1);
        // Draining the FIFO tells the main loop it can send more.
        let mut byte = [0u8];
        for _ in 0..n {
            console.read(0, &mut byte);
            assert_eq!(byte, [b'x']);
        }
        assert_eq!(drained.read().unwrap(), 1);
        // Multi-byte or out-of-range accesses are ignored, never a panic.
        let mut two = [0u8; 2];
        console.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        console.write(9, &[1]);
    }
}
