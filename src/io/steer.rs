//! CPU-local steering for the multi-queue userspace data plane: a packet goes to the queue
//! of the CPU it is being processed on (a TUN steering eBPF program; a `SO_REUSEPORT`
//! classic BPF program), and each queue's packet threads run on that CPU. A packet thread
//! is then woken on the CPU that is already busy with the packet, not by an interrupt to
//! another, idle CPU (which in a VM is halted: waking it costs tens of microseconds, four
//! times per round trip through two userspace nodes).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `TUNSETSTEERINGEBPF` (`_IOR('T', 224, int)`).
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
/// `bpf(2)` command `BPF_PROG_LOAD`.
const BPF_PROG_LOAD: libc::c_int = 5;
/// `BPF_PROG_TYPE_SOCKET_FILTER`: the type TUN steering programs have.
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `BPF_FUNC_get_smp_processor_id`.
const BPF_FUNC_GET_SMP_PROCESSOR_ID: i32 = 8;
/// `SKF_AD_OFF + SKF_AD_CPU`: the classic BPF load of the current CPU.
const SKF_AD_CPU: u32 = (-0x1000i32 + 36) as u32;
/// `SO_DETACH_REUSEPORT_BPF`.
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel accepts a prefix).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Steers every packet the kernel sends into the TUN device (any of its queue descriptors)
/// to queue `cpu % queues`, or with `on` false removes such a program (a predecessor's).
pub fn steer_tun_by_cpu(tun: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let prog = if on { Some(load_cpu_program()?) } else { None };
    let fd: libc::c_int = prog.as_ref().map_or(-1, |p| p.as_raw_fd());
    // SAFETY: the ioctl reads one int (a program descriptor or -1) from a live local.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETSTEERINGEBPF, &fd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // The device holds its own reference to the program; ours closes here.
    Ok(())
}

/// Loads `r0 = bpf_get_smp_processor_id(); exit`.
fn load_cpu_program() -> io::Result<OwnedFd> {
    let insns = [
        BpfInsn {
            code: 0x85, // BPF_JMP | BPF_CALL
            regs: 0,
            off: 0,
            imm: BPF_FUNC_GET_SMP_PROCESSOR_ID,
        },
        BpfInsn {
            code: 0x95, // BPF_JMP | BPF_EXIT
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"flannelrs");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD prefix whose pointers (instructions, license)
    // point to locals that outlive the call; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes the `SO_REUSEPORT` group of `sock` pick socket `cpu % n` (in the order the
/// sockets joined) for each arriving datagram, or with `on` false restores the kernel's
/// 4-tuple hash. An index past the group falls back to the hash.
pub fn steer_group_by_cpu(sock: BorrowedFd<'_>, n: u32, on: bool) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    if !on {
        // The value is ignored, but the kernel wants an int's worth of it.
        let unused: libc::c_int = 0;
        // SAFETY: the option value is a live local int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_DETACH_REUSEPORT_BPF,
                (&unused as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let err = io::Error::last_os_error();
        // ENOENT: no program attached, nothing to undo.
        return if rc == 0 || err.raw_os_error() == Some(libc::ENOENT) {
            Ok(())
        } else {
            Err(err)
        };
    }
    let mut filter = [
        // A = current CPU
        libc::sock_filter {
            code: 0x20, // BPF_LD | BPF_W | BPF_ABS
            jt: 0,
            jf: 0,
            k: SKF_AD_CPU,
        },
        // A %= n
        libc::sock_filter {
            code: 0x94, // BPF_ALU | BPF_MOD | BPF_K
            jt: 0,
            jf: 0,
            k: n.max(1),
        },
        // return A
        libc::sock_filter {
            code: 0x16, // BPF_RET | BPF_A
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` describes the live local `filter`; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to the CPU that steering sends queue `q` of `n` to: the first
/// CPU this process may run on whose number is `q` modulo `n`. Returns that CPU, or None
/// (not pinned) when no allowed CPU maps to `q`.
pub fn pin_thread_to_queue(q: usize, n: usize) -> io::Result<Option<usize>> {
    let n = n.max(1);
    // SAFETY: cpu_set_t is plain data; zero is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size matches the set we pass.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set at an index below its capacity.
    let Some(cpu) = (0..max).find(|&c| c % n == q && unsafe { libc::CPU_ISSET(c, &allowed) })
    else {
        return Ok(None);
    };
    // SAFETY: as above; the new set holds the one CPU.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below the set's capacity.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: pid 0 is the calling thread; the size matches the set.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(cpu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::udp::VxlanSocket;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// Two sockets sharing a loopback port with `SO_REUSEPORT` (the second in index 1),
    /// bound as the data plane binds its group.
    fn group() -> (Vec<UdpSocket>, SocketAddr) {
        let free = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let g = VxlanSocket::bind_group(free, Duration::from_millis(100), 2).unwrap();
        let socks = g
            .iter()
            .map(|s| {
                let u = UdpSocket::from(s.as_fd().try_clone_to_owned().unwrap());
                u.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                u
            })
            .collect();
        (socks, free)
    }

    /// Sends 20 datagrams from one socket on a thread pinned to `cpu`; which group socket
    /// got each.
    fn receivers(group: &[UdpSocket], to: SocketAddr, cpu: usize, from: &UdpSocket) -> Vec<usize> {
        let from = from.try_clone().unwrap();
        std::thread::spawn(move || {
            pin_thread_to_queue(cpu, usize::MAX).unwrap();
            for _ in 0..20 {
                from.send_to(b"x", to).unwrap();
            }
        })
        .join()
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        for (i, s) in group.iter().enumerate() {
            while s.recv(&mut buf).is_ok() {
                got.push(i);
            }
        }
        got
    }

    #[test]
    fn the_group_program_picks_the_socket_of_the_cpu_and_detaching_restores_the_hash() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (g, addr) = group();
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Detaching with nothing attached is fine.
        steer_group_by_cpu(g[0].as_fd(), 2, false).unwrap();
        steer_group_by_cpu(g[0].as_fd(), 2, true).unwrap();
        for cpu in 0..cpus.min(2) {
            assert_eq!(
                receivers(&g, addr, cpu, &from),
                vec![cpu; 20],
                "sent on CPU {cpu}"
            );
        }
        steer_group_by_cpu(g[1].as_fd(), 2, false).unwrap();
        let a = receivers(&g, addr, 0, &from);
        let b = receivers(&g, addr, cpus.min(2) - 1, &from);
        assert_eq!(a.len(), 20);
        assert!(
            a.iter().chain(&b).all(|&s| s == a[0]),
            "one 4-tuple, one socket: {a:?} {b:?}"
        );
    }
}
