//! UFFDIO_API feature bits and registration modes.

/// A set of `UFFD_FEATURE_*` bits, as requested from or reported by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

impl Features {
    pub const PAGEFAULT_FLAG_WP: Self = Self(1 << 0);
    pub const EVENT_FORK: Self = Self(1 << 1);
    pub const EVENT_REMAP: Self = Self(1 << 2);
    pub const EVENT_REMOVE: Self = Self(1 << 3);
    pub const MISSING_HUGETLBFS: Self = Self(1 << 4);
    pub const MISSING_SHMEM: Self = Self(1 << 5);
    pub const EVENT_UNMAP: Self = Self(1 << 6);
    pub const SIGBUS: Self = Self(1 << 7);
    pub const THREAD_ID: Self = Self(1 << 8);
    pub const MINOR_HUGETLBFS: Self = Self(1 << 9);
    pub const MINOR_SHMEM: Self = Self(1 << 10);
    pub const EXACT_ADDRESS: Self = Self(1 << 11);
    pub const WP_HUGETLBFS_SHMEM: Self = Self(1 << 12);
    pub const WP_UNPOPULATED: Self = Self(1 << 13);
    pub const POISON: Self = Self(1 << 14);
    pub const WP_ASYNC: Self = Self(1 << 15);
    pub const MOVE: Self = Self(1 << 16);

    pub const fn empty() -> Self {
        Self(0)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits of `self` that `available` lacks.
    pub const fn missing_from(self, available: Self) -> Self {
        Self(self.0 & !available.0)
    }
}

impl std::ops::BitOr for Features {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Features {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

/// What a registration traps: `UFFDIO_REGISTER_MODE_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    /// Faults on pages not present in the page tables (or, for shmem, not in the page cache).
    pub const MISSING: Self = Self(1 << 0);
    /// Writes to write-protected pages.
    pub const WP: Self = Self(1 << 1);
    /// Faults on pages present in the page cache but not mapped (shmem/hugetlbfs).
    pub const MINOR: Self = Self(1 << 2);

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parse one mode name: `missing`, `wp` or `minor`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "missing" => Some(Self::MISSING),
            "wp" => Some(Self::WP),
            "minor" => Some(Self::MINOR),
            _ => None,
        }
    }
}

impl std::ops::BitOr for RegisterMode {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Which `UFFDIO_*` ioctls a registered range supports (bit n = ioctl number n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ioctls(pub u64);

impl Ioctls {
    pub const WAKE: u64 = 0x02;
    pub const COPY: u64 = 0x03;
    pub const ZEROPAGE: u64 = 0x04;
    pub const MOVE: u64 = 0x05;
    pub const WRITEPROTECT: u64 = 0x06;
    pub const CONTINUE: u64 = 0x07;
    pub const POISON: u64 = 0x08;

    /// Whether ioctl number `nr` (one of the constants above) is supported.
    pub const fn supports(self, nr: u64) -> bool {
        self.0 & (1 << nr) != 0
    }
}
