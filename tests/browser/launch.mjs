// What every browser script shares: Debian's Chromium launched headless as the tests want
// it, and a journey run to its end or to its first failed expectation (`not ok - ...`, exit 1).
import { chromium } from "playwright-core";

export const timeout = 15_000;

// Each expectation met is said as `ok - ...`; browser.rs counts them.
export const step = (text) => console.log(`ok - ${text}`);

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
}

// Run `journey(browser)`; the browser is closed however it ends.
export async function run(journey) {
  const browser = await launch();
  try {
    await journey(browser);
  } catch (error) {
    console.error(`not ok - ${error.message}`);
    await browser.close();
    process.exit(1);
  }
  await browser.close();
}
