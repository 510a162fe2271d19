//! The packet headers the programs read and write, as they are on the wire.

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet: what encapsulation inserts after the outer Ethernet.
pub const ENCAP_ROOM: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_TCP: u8 = 6;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;
/// "More fragments" flag and fragment offset bits of `frag_off`.
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;
/// The VXLAN "I" flag: the VNI is valid (RFC 7348).
pub const VXLAN_FLAG_VNI: u8 = 0x08;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Big-endian.
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

/// The first four bytes of a TCP header: the ports, big-endian.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpPorts {
    pub source: u16,
    pub dest: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    /// Flags in the first byte, then 24 reserved bits.
    pub flags: [u8; 4],
    /// VNI in the top 24 bits, then 8 reserved bits.
    pub vni_reserved: [u8; 4],
}

impl VxlanHdr {
    pub fn vni(&self) -> u32 {
        u32::from_be_bytes([
            0,
            self.vni_reserved[0],
            self.vni_reserved[1],
            self.vni_reserved[2],
        ])
    }

    pub fn new(vni: u32) -> Self {
        let [_, a, b, c] = vni.to_be_bytes();
        Self {
            flags: [VXLAN_FLAG_VNI, 0, 0, 0],
            vni_reserved: [a, b, c, 0],
        }
    }
}

/// Everything encapsulation writes after the outer Ethernet header, in one piece.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EncapHeaders {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

/// The IPv4 header checksum (RFC 1071) of a header with `check` = 0.
pub fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    // SAFETY: `Ipv4Hdr` is 20 bytes of plain integers with no padding, so it
    // can be read as ten 16-bit words.
    let words: &[u16; 10] = unsafe { &*(ip as *const Ipv4Hdr as *const [u16; 10]) };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 10 {
        sum += u32::from(words[i]);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
