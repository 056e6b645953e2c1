//! The guest's ways out: ACPI sleep control (poweroff), the ACPI reset register, and the i8042
//! "pulse reset line" command that `reboot=k` kernels use.

use crate::arch::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
};
use crate::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// SLP_EN in the hardware-reduced sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;

/// Sleep control, sleep status and reset registers (three consecutive I/O ports).
pub struct AcpiPm {
    exit: ExitHandle,
}

impl AcpiPm {
    pub const BASE: u16 = ACPI_SLEEP_CONTROL_PORT;
    pub const LEN: u64 = 3;

    pub fn new(exit: ExitHandle) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = Self::BASE + offset as u16;
        if port == ACPI_SLEEP_CONTROL_PORT && value & SLEEP_ENABLE != 0 {
            let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
            if sleep_type == ACPI_S5_SLEEP_TYPE {
                log::info!("guest powered off (ACPI S5)");
                self.exit.request(VmExit::PowerOff);
            } else {
                log::warn!("guest asked for unsupported sleep type {sleep_type}; ignored");
            }
        } else if port == ACPI_RESET_PORT && value == ACPI_RESET_VALUE {
            log::info!("guest reset (ACPI reset register)");
            self.exit.request(VmExit::Reset);
        }
    }
}

/// Only the reset command of the keyboard controller; status reads say "nothing pending".
pub struct I8042 {
    exit: ExitHandle,
}

const I8042_COMMAND_OFFSET: u64 = 4;
const I8042_CMD_RESET: u8 = 0xfe;

impl I8042 {
    pub const LEN: u64 = 5;

    pub fn new(exit: ExitHandle) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET) {
            log::info!("guest reset (i8042)");
            self.exit.request(VmExit::Reset);
        }
    }
}

/// Ports every PC has that we deliberately leave empty (POST code, DMA page registers...):
/// writes are dropped and reads float high, without a log line per access.
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        // Another sleep type is not poweroff.
        pm.write(0, &[(3 << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE]);
        // Without SLP_EN nothing happens.
        pm.write(0, &[ACPI_S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]);
        assert_eq!(exit.reason(), None);
        pm.write(
            0,
            &[(ACPI_S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE],
        );
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));

        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(2, &[ACPI_RESET_VALUE + 1]);
        assert_eq!(exit.reason(), None);
        pm.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn i8042_reset_command() {
        let exit = ExitHandle::new().unwrap();
        let mut kbd = I8042::new(exit.clone());
        let mut status = [0xaa];
        kbd.read(4, &mut status);
        assert_eq!(status, [0]);
        kbd.write(0, &[I8042_CMD_RESET]);
        assert_eq!(exit.reason(), None);
        kbd.write(4, &[I8042_CMD_RESET]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
