// A room that asks for a proof of work, in a real headless Chromium: the page solves it with
// WebCrypto and the visitor goes on through the line without doing anything. Prints how long
// the solving took each time (measured by the page) and the whole way to the shop.
//
//   node tests/browser/challenge.mjs http://127.0.0.1:PORT [ROUNDS]
//
// The gate must guard /checkout in front of the demo shop with `challenge = "pow"`, the room
// idle (each visitor is let through at once once solved).
import { run } from "./launch.mjs";

const [base, rounds = "5"] = process.argv.slice(2);
if (!base) {
  console.error("usage: challenge.mjs BASE_URL [ROUNDS]");
  process.exit(2);
}
const timeout = 60_000;
await run(async (browser) => {
  for (let round = 1; round <= Number(rounds); round++) {
    const context = await browser.newContext({ viewport: { width: 320, height: 640 } });
    const page = await context.newPage();
    const started = Date.now();
    await page.goto(`${base}/checkout`);
    await page.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
    const total = Date.now() - started;
    const solved = await page.evaluate(() => sessionStorage.getItem("vestibule-pow-ms"));
    if (solved === null) throw new Error("the visitor reached the shop without solving the challenge");
    console.log(`ok - visitor ${round} solved the proof of work in ${solved} ms and reached the shop in ${total} ms`);
    await context.close();
  }
});
