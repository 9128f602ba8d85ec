//! The CLI's tables and sizes: columns as wide as their longest cell, and
//! byte counts in binary units (B, KiB, MiB, GiB, TiB), which is what they are.

/// Which side of its column a cell keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Rows of cells printed as aligned columns, one space apart. Each column is
/// as wide as its longest cell, so a long pod name moves the columns after
/// it rather than pushing its own row out of line.
#[derive(Debug, Clone)]
pub struct Table {
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with one column per entry of `aligns`.
    pub fn new(aligns: &[Align]) -> Self {
        Self {
            aligns: aligns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, cells past the last column are
    /// dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells
            .into_iter()
            .take(self.aligns.len())
            .map(Into::into)
            .collect();
        row.resize(self.aligns.len(), String::new());
        self.rows.push(row);
    }

    /// The rows, laid out. Trailing blanks are cut: the last column is
    /// left free to run on (an error text), and empty cells at a row's end
    /// leave nothing behind.
    pub fn lines(&self) -> Vec<String> {
        let widths: Vec<usize> = (0..self.aligns.len())
            .map(|column| {
                self.rows
                    .iter()
                    .map(|row| width(&row[column]))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        self.rows
            .iter()
            .map(|row| {
                let mut line = String::new();
                for (column, cell) in row.iter().enumerate() {
                    if column > 0 {
                        line.push(' ');
                    }
                    let pad = " ".repeat(widths[column] - width(cell));
                    match self.aligns[column] {
                        Align::Left => {
                            line.push_str(cell);
                            line.push_str(&pad);
                        }
                        Align::Right => {
                            line.push_str(&pad);
                            line.push_str(cell);
                        }
                    }
                }
                line.truncate(line.trim_end().len());
                line
            })
            .collect()
    }
}

/// A cell's width on a terminal: characters, not bytes (a pod's error may
/// quote anything).
fn width(cell: &str) -> usize {
    cell.chars().count()
}

/// Bytes in the largest binary unit that keeps the number under 1024:
/// whole bytes below 1 KiB, one decimal above.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 1;
    // 1023.95 and above would print as "1024.0": the next unit says it better.
    while value >= 1023.95 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_longest_cell() {
        let mut table = Table::new(&[Align::Left, Align::Right, Align::Left]);
        table.row(["POD", "PORT", "STATE"]);
        table.row(["web", "21000", "active"]);
        table.row(["a-longer-name", "8", "stopped"]);
        let lines = table.lines();
        assert_eq!(
            lines,
            [
                "POD            PORT STATE",
                "web           21000 active",
                "a-longer-name     8 stopped",
            ]
        );
    }

    #[test]
    fn a_55_character_pod_name_keeps_every_row_aligned() {
        let long = "p".repeat(55);
        let rows = [
            ("POD", "PORT", "STATE"),
            ("web", "21000", "active"),
            (long.as_str(), "21001", "stopped"),
            ("  :9090 metrics", "8", "not fwd"),
        ];
        let mut table = Table::new(&[Align::Left, Align::Right, Align::Left]);
        for (pod, port, state) in rows {
            table.row([pod, port, state]);
        }
        // The name column is 55 wide, the port column 5: each state starts
        // at 55 + 1 + 5 + 1, each port ends one before.
        for (line, (pod, port, state)) in table.lines().iter().zip(rows) {
            assert!(line.starts_with(pod), "{line}");
            assert_eq!(line.find(state), Some(62), "{line}");
            assert!(line[..61].ends_with(port), "{line}");
            assert_eq!(&line[61..62], " ", "{line}");
        }
    }

    #[test]
    fn short_rows_are_filled_and_trailing_blanks_cut() {
        let mut table = Table::new(&[Align::Left, Align::Left, Align::Left]);
        table.row(["a", "bb"]);
        table.row(["ccc", "d", "e"]);
        assert_eq!(table.lines(), ["a   bb", "ccc d  e"]);
    }

    #[test]
    fn sizes_change_unit_at_each_power_of_1024() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(human_bytes(1024 * 1024), "1.0 MiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 + 512 * 1024), "5.5 MiB");
        assert_eq!(human_bytes(1024 * 1024 * 1024), "1.0 GiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(human_bytes(1 << 40), "1.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }
}
