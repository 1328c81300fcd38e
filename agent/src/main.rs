fn main() {
    println!("pagewise");
}
